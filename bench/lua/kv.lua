-- Plain load: errors are wrk's own (socket errors, and statuses >= 400 in "status").
-- wrk ... -s bench/lua/kv.lua URL -- tenant mode keys value_size get_pct batch
local M = dofile(debug.getinfo(1, "S").source:match("^@(.*/)") .. "common.lua")
setup = M.setup
init = M.init
request = M.request
done = function(s, l, r) M.done(s, l, r, false) end
