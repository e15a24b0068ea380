-- @description Segue: insert another variation
-- @about
--   Replaces the continuation Segue inserted last with the next variation of the same request (move it
--   away first to keep it); when every variation was used, asks the server for new ones.
local here = debug.getinfo(1, "S").source:match("^@?(.*[/\\])") or ""
local segue = dofile(here .. "segue.lua")
segue.another_variation()
