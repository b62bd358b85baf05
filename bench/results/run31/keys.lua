local keys = {}
local n = 0
local body = '{"value":"' .. string.rep("v", 98) .. '"}'
local headers = {["Content-Type"]="application/json"}
local prefix
function init(args)
  prefix = "/" .. args[1] .. "/kv/"
  for line in io.lines(args[2]) do n = n + 1; keys[n] = line end
  math.randomseed(os.time() * 1000 + math.floor(os.clock() * 1e6))
end
function request()
  return wrk.format("PUT", prefix .. keys[math.random(1, n)], headers, body)
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("RESULT %d %d %d\n", summary.requests, summary.duration,
    e.status + e.connect + e.read + e.write + e.timeout))
end
