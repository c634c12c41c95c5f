-- Replays at a fixed offered load (the p99 comparison).
function init(args) post_init(args) end
function request()
   return post("/v1/charges", "replay-" .. math.random(nkeys))
end
delay = paced_delay
