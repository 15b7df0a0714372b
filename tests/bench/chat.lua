-- wrk script for the end-to-end benchmark (tests/bench/e2e.py).
--
-- Every request is a POST of the same ~1 KB chat body (read from the file
-- named by BENCH_BODY) with Content-Type and Authorization headers, as an
-- OpenAI SDK sends it. BENCH_STREAM=1 adds "Accept: text/event-stream" (the
-- mock provider answers SSE on that header; the body says "stream": true).
--
-- done() prints one machine-readable line, so e2e.py does not have to parse
-- wrk's human output:  BENCH {"requests":…,"p50":…,…}  (latencies in µs,
-- from wrk's own per-request histogram: time from the request's first byte
-- written to the response's last byte read, closed loop, no coordinated-
-- omission correction — the right model for a fixed number of connections).

local f = assert(io.open(os.getenv("BENCH_BODY"), "rb"))
local body = f:read("*a")
f:close()

wrk.method = "POST"
wrk.body = body
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer " .. (os.getenv("BENCH_KEY") or "")
if os.getenv("BENCH_STREAM") == "1" then
    wrk.headers["Accept"] = "text/event-stream"
else
    wrk.headers["Accept"] = "application/json"
end

function done(summary, latency, requests)
    local e = summary.errors
    io.write(string.format(
        'BENCH {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,'
            .. '"write":%d,"status":%d,"timeout":%d,"p50":%d,"p90":%d,"p99":%d,'
            .. '"mean":%.1f,"max":%d}\n',
        summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
        e.status, e.timeout, latency:percentile(50), latency:percentile(90),
        latency:percentile(99), latency.mean, latency.max))
end
