-- wrk script for bench/http.sh: each request classifies one short SST-2 sentence with a task
-- chosen at random among the server's synthetic tasks.
-- Reads BENCH_INPUTS (one JSON-encoded string per line) and BENCH_TASKS (task count).
local inputs = {}
for line in io.lines(os.getenv("BENCH_INPUTS")) do
  inputs[#inputs + 1] = line
end
local tasks = tonumber(os.getenv("BENCH_TASKS") or "100")

math.randomseed(os.time())
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"

request = function()
  local task = string.format("task%03d", math.random(0, tasks - 1))
  local text = inputs[math.random(1, #inputs)]
  local body = '{"task":"' .. task .. '","inputs":' .. text .. '}'
  return wrk.format(nil, "/v1/classify", nil, body)
end

local errors = 0
response = function(status, headers, body)
  if status ~= 200 then
    errors = errors + 1
  end
end

done = function(summary, latency, requests)
  io.write(string.format(
    '{"requests":%d,"duration_s":%.3f,"req_per_s":%.1f,"p50_ms":%.2f,"p90_ms":%.2f,"p99_ms":%.2f,"non_2xx":%d,"socket_errors":%d}\n',
    summary.requests, summary.duration / 1e6, summary.requests / (summary.duration / 1e6),
    latency:percentile(50) / 1000, latency:percentile(90) / 1000, latency:percentile(99) / 1000,
    summary.errors.status, summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
