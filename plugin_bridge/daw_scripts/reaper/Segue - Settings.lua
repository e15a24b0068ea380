-- @description Segue: settings
-- @about
--   Bars to add, variations, temperature, seed, the server's address and the path of the segue program.
--   Kept by REAPER between sessions.
local here = debug.getinfo(1, "S").source:match("^@?(.*[/\\])") or ""
local segue = dofile(here .. "segue.lua")
segue.edit_settings()
