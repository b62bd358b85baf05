-- Shared by the wrk scripts in bench/lua/. Loaded with dofile() from the script's own directory.
--
-- Arguments (after `--` on the wrk command line):
--   1 tenant      URL prefix /<tenant>/
--   2 mode        get | miss | put | mix | bulk_get | bulk_put
--   3 keys        key space: keys are "k<N>", N uniform in [0, keys)
--   4 value size  bytes of the stored JSON value (a string of size-2 characters plus its quotes)
--   5 get %       mix only: share of GETs, the rest are PUTs
--   6 batch       bulk only: operations per request
--   7 delay ms    paced scripts only: mean pause per connection between requests
-- done() prints one line: BENCH_JSON {...} with requests, duration, latency percentiles (microseconds) and errors.

local M = {}

local cfg = {}
local put_body, get_paths
local threads = {}

function M.setup(thread)
  thread:set("thread_id", #threads + 1)
  table.insert(threads, thread)
end

function M.init(args)
  cfg.tenant = args[1] or "bench"
  cfg.mode = args[2] or "get"
  cfg.keys = tonumber(args[3] or "10000")
  cfg.vsize = tonumber(args[4] or "100")
  cfg.getpct = tonumber(args[5] or "90")
  cfg.batch = tonumber(args[6] or "100")
  cfg.delay = tonumber(args[7] or "0")
  math.randomseed(os.time() * 1000 + (thread_id or 0) * 7919)
  local value = string.rep("v", math.max(cfg.vsize - 2, 0))
  put_body = '{"value":"' .. value .. '"}'
  cfg.value = value
  cfg.prefix = "/" .. cfg.tenant .. "/kv/"
  cfg.headers = {["Content-Type"] = "application/json"}
  unexpected = 0
end

local function key()
  return "k" .. math.random(0, cfg.keys - 1)
end

local function bulk_body()
  local parts = {}
  if cfg.mode == "bulk_get" then
    for i = 1, cfg.batch do parts[i] = '"' .. key() .. '"' end
    return '{"get":[' .. table.concat(parts, ",") .. ']}'
  end
  for i = 1, cfg.batch do
    parts[i] = '{"key":"' .. key() .. '","value":"' .. cfg.value .. '"}'
  end
  return '{"put":[' .. table.concat(parts, ",") .. ']}'
end

function M.request()
  local mode = cfg.mode
  if mode == "get" then
    return wrk.format("GET", cfg.prefix .. key())
  elseif mode == "miss" then
    return wrk.format("GET", cfg.prefix .. "miss" .. math.random(0, 999999999))
  elseif mode == "put" then
    return wrk.format("PUT", cfg.prefix .. key(), cfg.headers, put_body)
  elseif mode == "mix" then
    if math.random(1, 100) <= cfg.getpct then
      return wrk.format("GET", cfg.prefix .. key())
    end
    return wrk.format("PUT", cfg.prefix .. key(), cfg.headers, put_body)
  elseif mode == "bulk_get" or mode == "bulk_put" then
    return wrk.format("POST", "/" .. cfg.tenant .. "/bulk", cfg.headers, bulk_body())
  end
  error("unknown mode " .. tostring(mode))
end

-- Statuses that are not errors for the scripts that count (a GET miss is a 404 by design).
function M.response(status, headers, body)
  if status ~= 200 and status ~= 201 and status ~= 404 then
    unexpected = unexpected + 1
  end
end

-- A pause averaging cfg.delay ms: wrk takes whole milliseconds, so round up or down at random.
function M.delay()
  local d = cfg.delay
  local base = math.floor(d)
  if math.random() < d - base then base = base + 1 end
  return base
end

function M.done(summary, latency, requests, counted)
  local e = summary.errors
  local bad = -1
  if counted then
    bad = 0
    for _, t in ipairs(threads) do bad = bad + (tonumber(t:get("unexpected")) or 0) end
  end
  io.write(string.format(
    'BENCH_JSON {"requests":%d,"duration_us":%d,"bytes":%d,"latency_mean_us":%.1f,"latency_max_us":%d,' ..
    '"p50_us":%d,"p90_us":%d,"p99_us":%d,"p999_us":%d,' ..
    '"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},"unexpected_status":%d}\n',
    summary.requests, summary.duration, summary.bytes, latency.mean, latency.max,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency:percentile(99.9),
    e.connect, e.read, e.write, e.status, e.timeout, bad))
end

return M
