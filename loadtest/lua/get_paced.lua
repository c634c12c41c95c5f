-- Pass-through GETs at a fixed offered load (the p50/p99 comparison; on the do-nothing
-- proxy, its side of it).
function init(args) post_init(args) end
function request()
   return wrk.format("GET", "/v1/ping", {["Authorization"] = AUTH})
end
delay = paced_delay
