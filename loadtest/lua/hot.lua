-- Hot key: every connection sends the same key (fresh per run); route concurrent: wait.
function init(args) post_init(args) end
function request()
   return post("/v1/hot", "hot-" .. nonce)
end
