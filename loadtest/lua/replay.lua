-- Replays: keys drawn at random from the pre-filled set replay-1 .. replay-N.
function init(args) post_init(args) end
function request()
   return post("/v1/charges", "replay-" .. math.random(nkeys))
end
