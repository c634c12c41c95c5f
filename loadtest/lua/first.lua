-- First requests: a new Idempotency-Key on every request (nonce, thread, counter).
function init(args) post_init(args) end
function request()
   n = n + 1
   return post("/v1/charges", nonce .. "-" .. tid .. "-" .. n)
end
