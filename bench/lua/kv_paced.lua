-- Like kv_counted.lua, with a pause between requests on each connection (argument 7, mean ms), to hold
-- a rate below saturation. wrk (unlike wrk2) does not correct for coordinated omission.
local M = dofile(debug.getinfo(1, "S").source:match("^@(.*/)") .. "common.lua")
setup = M.setup
init = M.init
request = M.request
response = M.response
delay = M.delay
done = function(s, l, r) M.done(s, l, r, true) end
