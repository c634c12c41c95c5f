-- Pass-through POSTs at a fixed offered load (the p50/p99 comparison).
function init(args) post_init(args) end
function request()
   return pass_post()
end
delay = paced_delay
