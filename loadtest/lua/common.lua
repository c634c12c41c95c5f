-- Prepended to every scenario script: one machine-readable summary line at the end.
-- Latencies are microseconds. Non-2xx/3xx answers count as errors.status.
function done(summary, latency, requests)
   local e = summary.errors
   io.write(string.format(
      'WRK_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,' ..
      '"write":%d,"status":%d,"timeout":%d,"mean":%.1f,"max":%d,"p50":%d,"p90":%d,' ..
      '"p99":%d,"p999":%d}\n',
      summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
      e.status, e.timeout, latency.mean, latency.max, latency:percentile(50),
      latency:percentile(90), latency:percentile(99), latency:percentile(99.9)))
end

-- Shared by the POST scenarios; args: nonce [keys] [delay_ms]
AUTH = "__AUTH__"
BODY = '__BODY__'
local threads = {}
local counter = 0

function setup(thread)
   counter = counter + 1
   thread:set("tid", counter)
   table.insert(threads, thread)
end

function post_init(args)
   nonce = args[1] or "x"
   nkeys = tonumber(args[2] or "0")
   delay_ms = tonumber(args[3] or "0")
   math.randomseed(os.time() + (tid or 0) * 7919)
   n = 0
end

function post(path, key)
   return wrk.format("POST", path, {
      ["Authorization"] = AUTH,
      ["Content-Type"] = "application/json",
      ["Idempotency-Key"] = key,
   }, BODY)
end

function pass_post()
   return wrk.format("POST", "/v1/orders", {
      ["Authorization"] = AUTH,
      ["Content-Type"] = "application/json",
   }, BODY)
end

-- Paced runs (same offered load for both targets): a jittered pause per connection.
function paced_delay()
   return delay_ms * (0.9 + 0.2 * math.random())
end
