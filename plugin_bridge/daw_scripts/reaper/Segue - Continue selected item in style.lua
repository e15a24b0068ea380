-- @description Segue: continue selected item in style
-- @about
--   Sends the selected MIDI item to the running `segue serve` and inserts the continuation as a new
--   MIDI item right after it (one undo point). Needs segue.lua beside this file; settings: "Segue - Settings".
local here = debug.getinfo(1, "S").source:match("^@?(.*[/\\])") or ""
local segue = dofile(here .. "segue.lua")
segue.continue_selected()
