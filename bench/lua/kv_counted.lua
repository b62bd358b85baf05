-- Like kv.lua, but inspects each status: 200/201/404 are fine, anything else counts as "unexpected_status".
-- For GET misses (404 by design) and the soak (evictions turn GETs into 404s).
local M = dofile(debug.getinfo(1, "S").source:match("^@(.*/)") .. "common.lua")
setup = M.setup
init = M.init
request = M.request
response = M.response
done = function(s, l, r) M.done(s, l, r, true) end
