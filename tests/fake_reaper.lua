-- A fake `reaper` table for running Segue's ReaScripts under plain lua5.4 (tests/test_reaper_script.py).
--
-- It simulates a project (tracks, MIDI items with takes and notes, one tempo and meter), records every
-- API call that changes something or talks to the musician, and really runs the command given to
-- ExecProcess (in the background for a negative timeout, as REAPER does). reaper.defer queues the
-- function; fake.run_deferred() plays REAPER's defer loop: one round of queued functions, a short
-- real sleep, again, until nothing is queued. fake.dump(path) writes the project and the call log as JSON.

local fake = {calls = {}, ext = {}, persisted = {}, tracks = {}, deferred = {}, clock = 1000.0,
              tempo = 120, numerator = 4, denominator = 4, os = "Linux-x86_64", user_inputs = nil,
              exec_log = "/dev/null"}
local PPQ = 960
local guid_counter = 0

local function new_guid()
  guid_counter = guid_counter + 1
  return string.format("{00000000-0000-0000-0000-%012d}", guid_counter)
end

local function record(name, ...)
  fake.calls[#fake.calls + 1] = {name = name, args = {...}}
end

-- --- the project -----------------------------------------------------------------------------------

function fake.add_track(name)
  local track = {kind = "track", name = name, guid = new_guid(), items = {}}
  fake.tracks[#fake.tracks + 1] = track
  return track
end

local function time_to_qn(t)
  return t * fake.tempo / 60
end

local function qn_to_time(qn)
  return qn * 60 / fake.tempo
end

-- notes: {pitch, velocity, start_qn_in_item, duration_qn, channel, muted}
function fake.add_item(track, spec)
  local item = {kind = "item", track = track, position = spec.position, length = spec.length, guid = new_guid(),
                selected = spec.selected or false}
  if spec.midi ~= false then
    item.take = {kind = "take", item = item, midi = true, notes = {}, name = spec.name or ""}
    for _, n in ipairs(spec.notes or {}) do
      item.take.notes[#item.take.notes + 1] = {pitch = n[1], velocity = n[2], startppq = math.floor(n[3] * PPQ + 0.5),
        endppq = math.floor((n[3] + n[4]) * PPQ + 0.5), channel = n[5] or 0, muted = n[6] or false, selected = false}
    end
  elseif spec.audio then
    item.take = {kind = "take", item = item, midi = false, notes = {}, name = "audio"}
  end
  track.items[#track.items + 1] = item
  return item
end

local function item_start_qn(item)
  return time_to_qn(item.position)
end

-- --- the API ----------------------------------------------------------------------------------------

local reaper = {}

function reaper.GetSelectedMediaItem(_, index)
  local seen = 0
  for _, track in ipairs(fake.tracks) do
    for _, item in ipairs(track.items) do
      if item.selected then
        if seen == index then return item end
        seen = seen + 1
      end
    end
  end
  return nil
end

function reaper.CountSelectedMediaItems(_)
  local count = 0
  for _, track in ipairs(fake.tracks) do
    for _, item in ipairs(track.items) do
      if item.selected then count = count + 1 end
    end
  end
  return count
end

function reaper.GetActiveTake(item) return item.take end
function reaper.TakeIsMIDI(take) return take.midi end
function reaper.GetMediaItem_Track(item) return item.track end

function reaper.GetMediaItemInfo_Value(item, key)
  if key == "D_POSITION" then return item.position end
  if key == "D_LENGTH" then return item.length end
  error("fake reaper: GetMediaItemInfo_Value " .. key .. " is not simulated")
end

function reaper.GetSetMediaItemInfo_String(item, key, value, set)
  assert(key == "GUID" and not set, "fake reaper: only reading an item's GUID is simulated")
  return true, item.guid
end

function reaper.GetSetMediaItemTakeInfo_String(take, key, value, set)
  assert(key == "P_NAME" and set, "fake reaper: only setting a take's name is simulated")
  record("GetSetMediaItemTakeInfo_String", key, value)
  take.name = value
  return true, value
end

function reaper.MIDI_CountEvts(take)
  return 1, #take.notes, 0, 0
end

function reaper.MIDI_GetNote(take, index)
  local n = take.notes[index + 1]
  if not n then return false end
  return true, n.selected, n.muted, n.startppq, n.endppq, n.channel, n.pitch, n.velocity
end

function reaper.MIDI_GetProjQNFromPPQPos(take, ppq)
  return item_start_qn(take.item) + ppq / PPQ
end

function reaper.MIDI_GetPPQPosFromProjQN(take, qn)
  return (qn - item_start_qn(take.item)) * PPQ
end

function reaper.TimeMap2_timeToQN(_, t) return time_to_qn(t) end
function reaper.TimeMap2_QNToTime(_, qn) return qn_to_time(qn) end
function reaper.TimeMap_GetTimeSigAtTime(_, _)
  return fake.numerator, fake.denominator, fake.tempo
end

function reaper.CreateNewMIDIItemInProj(track, start, stop, qn)
  record("CreateNewMIDIItemInProj", track.name, start, stop, qn)
  local s, e = start, stop
  if qn then s, e = qn_to_time(start), qn_to_time(stop) end
  local item = fake.add_item(track, {position = s, length = e - s, notes = {}})
  item.created = true
  return item
end

function reaper.MIDI_InsertNote(take, selected, muted, startppq, endppq, channel, pitch, velocity, no_sort)
  record("MIDI_InsertNote", startppq, endppq, channel, pitch, velocity, no_sort)
  take.notes[#take.notes + 1] = {pitch = pitch, velocity = velocity, startppq = startppq, endppq = endppq,
                                 channel = channel, muted = muted, selected = selected}
  take.sorted = false
  return true
end

function reaper.MIDI_Sort(take)
  record("MIDI_Sort")
  table.sort(take.notes, function(a, b) return a.startppq < b.startppq end)
  take.sorted = true
end

function reaper.DeleteTrackMediaItem(track, item)
  record("DeleteTrackMediaItem", track.name, item.guid)
  for i, other in ipairs(track.items) do
    if other == item then
      table.remove(track.items, i)
      return true
    end
  end
  return false
end

function reaper.CountTracks(_) return #fake.tracks end
function reaper.GetTrack(_, index) return fake.tracks[index + 1] end
function reaper.GetTrackGUID(track) return track.guid end
function reaper.CountTrackMediaItems(track) return #track.items end
function reaper.GetTrackMediaItem(track, index) return track.items[index + 1] end

function reaper.SelectAllMediaItems(_, selected)
  for _, track in ipairs(fake.tracks) do
    for _, item in ipairs(track.items) do item.selected = selected end
  end
end

function reaper.SetMediaItemSelected(item, selected) item.selected = selected end

for _, name in ipairs({"Undo_BeginBlock", "Undo_EndBlock", "PreventUIRefresh", "UpdateArrange"}) do
  reaper[name] = function(...) record(name, ...) end
end

function reaper.ShowMessageBox(message, title, kind)
  record("ShowMessageBox", message, title, kind)
  return 1
end

function reaper.ShowConsoleMsg(message) record("ShowConsoleMsg", message) end

function reaper.GetUserInputs(title, count, captions, values)
  record("GetUserInputs", title, count, captions, values)
  if fake.user_inputs == nil then return false, values end
  return true, fake.user_inputs
end

function reaper.HasExtState(section, key) return fake.ext[section .. "/" .. key] ~= nil end
function reaper.GetExtState(section, key) return fake.ext[section .. "/" .. key] or "" end
function reaper.SetExtState(section, key, value, persist)
  fake.ext[section .. "/" .. key] = value
  if persist then fake.persisted[section .. "/" .. key] = value end
end
function reaper.DeleteExtState(section, key) fake.ext[section .. "/" .. key] = nil end

function reaper.GetOS() return fake.os end
function reaper.time_precise() return fake.clock end
function reaper.GetResourcePath() return os.getenv("HOME") or "/tmp" end

function reaper.RecursiveCreateDirectory(path, _)
  os.execute("mkdir -p '" .. path .. "'")
  return 1
end

function reaper.ExecProcess(command, timeout)
  record("ExecProcess", command, timeout)
  if timeout < 0 then  -- REAPER: start and return at once
    os.execute("(" .. command .. ") >>'" .. fake.exec_log .. "' 2>&1 &")
    return ""
  end
  local pipe = io.popen(command .. " 2>&1")
  local output = pipe:read("a")
  local _, _, code = pipe:close()
  return tostring(code) .. "\n" .. output
end

function reaper.defer(fn)
  fake.deferred[#fake.deferred + 1] = fn
end

-- --- driving and reading back -------------------------------------------------------------------------

-- REAPER's defer loop: run what is queued, wait a little, repeat; stops when nothing is queued or after
-- `limit` seconds of fake time (fake time never runs ahead of real time).
function fake.run_deferred(limit)
  local rounds, step = 0, 0.05
  while #fake.deferred > 0 do
    local queue = fake.deferred
    fake.deferred = {}
    for _, fn in ipairs(queue) do fn() end
    rounds = rounds + 1
    if #fake.deferred > 0 then
      os.execute("sleep " .. step)
      fake.clock = fake.clock + step
    end
    if rounds * step > (limit or 120) then error("fake reaper: the defer loop ran for over " .. limit .. " s") end
  end
  return rounds
end

-- Run an action script as REAPER does: a fresh chunk, then its defer loop.
function fake.run_action(path, limit)
  record("action", path)
  dofile(path)
  return fake.run_deferred(limit)
end

local function encode(value, out)
  local kind = type(value)
  if kind == "table" then
    if value.kind == "track" then
      return encode(value.name, out)
    elseif value.kind == "item" or value.kind == "take" then
      return encode(value.guid or "take", out)
    end
    local n = #value
    local is_array = n > 0 or next(value) == nil
    if is_array then
      out[#out + 1] = "["
      for i = 1, n do
        if i > 1 then out[#out + 1] = "," end
        encode(value[i], out)
      end
      out[#out + 1] = "]"
    else
      out[#out + 1] = "{"
      local first = true
      local keys = {}
      for k in pairs(value) do keys[#keys + 1] = tostring(k) end
      table.sort(keys)
      for _, k in ipairs(keys) do
        local v = value[k]
        if v == nil then v = value[tonumber(k)] end
        if not first then out[#out + 1] = "," end
        first = false
        encode(k, out)
        out[#out + 1] = ":"
        encode(v, out)
      end
      out[#out + 1] = "}"
    end
  elseif kind == "string" then
    out[#out + 1] = '"' .. value:gsub('[%c"\\]', function(c)
      return string.format("\\u%04x", c:byte())
    end) .. '"'
  elseif kind == "number" then
    if value ~= value or value == math.huge or value == -math.huge then
      out[#out + 1] = "null"
    else
      out[#out + 1] = string.format("%.10g", value)
    end
  elseif kind == "boolean" then
    out[#out + 1] = tostring(value)
  else
    out[#out + 1] = "null"
  end
end

function fake.dump(path)
  local project = {}
  for _, track in ipairs(fake.tracks) do
    local items = {}
    for _, item in ipairs(track.items) do
      local notes = {}
      for _, n in ipairs(item.take and item.take.notes or {}) do
        notes[#notes + 1] = {pitch = n.pitch, velocity = n.velocity, startppq = n.startppq, endppq = n.endppq,
                             channel = n.channel, muted = n.muted}
      end
      items[#items + 1] = {guid = item.guid, position = item.position, length = item.length,
                           position_qn = time_to_qn(item.position), end_qn = time_to_qn(item.position + item.length),
                           selected = item.selected, created = item.created or false, notes = notes,
                           name = item.take and item.take.name or "", sorted = item.take and item.take.sorted or false}
    end
    project[#project + 1] = {name = track.name, guid = track.guid, items = items}
  end
  local out = {}
  encode({tracks = project, calls = fake.calls, ext = fake.ext, persisted = fake.persisted, clock = fake.clock}, out)
  local file = assert(io.open(path, "w"))
  file:write(table.concat(out))
  file:close()
end

_G.reaper = reaper
return fake
