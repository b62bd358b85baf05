-- Short values over a small key space, against KV Responder or the Node.js reference (the kv API) or webdis.
-- wrk ... -s bench/lua/references.lua URL -- tenant mode keys value_size get_pct batch delay value
--   mode   get | put (GET / PUT /<tenant>/kv/k<N>, body {"value":"<value>"})
--          webdis_get | webdis_put (GET /GET/k<N>; PUT /SET/k<N> with the value as the raw body)
--   keys   keys are "k<N>", N uniform in [0, keys)
--   value  the stored string (arguments 4-7 are those of common.lua, unused here)
-- Errors are wrk's own (socket errors, and statuses >= 400): every key is loaded first, so a 404 is one.
local M = dofile(debug.getinfo(1, "S").source:match("^@(.*/)") .. "common.lua")
setup = M.setup

local mode, keys, prefix, put_body, raw_value
local json_headers = {["Content-Type"] = "application/json"}

function init(args)
  local tenant = args[1] or "bench"
  mode = args[2] or "get"
  keys = tonumber(args[3] or "1000")
  raw_value = args[8] or "hello world"
  prefix = "/" .. tenant .. "/kv/"
  put_body = '{"value":"' .. raw_value .. '"}'
  math.randomseed(os.time() * 1000 + (thread_id or 0) * 7919)
end

function request()
  local key = "k" .. math.random(0, keys - 1)
  if mode == "get" then
    return wrk.format("GET", prefix .. key)
  elseif mode == "put" then
    return wrk.format("PUT", prefix .. key, json_headers, put_body)
  elseif mode == "webdis_get" then
    return wrk.format("GET", "/GET/" .. key)
  elseif mode == "webdis_put" then
    return wrk.format("PUT", "/SET/" .. key, nil, raw_value)
  end
  error("unknown mode " .. tostring(mode))
end

done = function(s, l, r) M.done(s, l, r, false) end
