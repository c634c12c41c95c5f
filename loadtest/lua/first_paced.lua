-- First requests at a fixed offered load (the baselines' side of the p99 comparison).
function init(args) post_init(args) end
function request()
   n = n + 1
   return post("/v1/charges", nonce .. "-" .. tid .. "-" .. n)
end
delay = paced_delay
