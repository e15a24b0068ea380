-- Segue for REAPER: the code the Segue actions share. Not an action itself: load the three
-- "Segue - ....lua" files beside it into the Action List (docs/hosts-reaper.md).
--
-- How it works: the selected MIDI item is written to a temporary .mid, `segue client continue`
-- sends it to the running `segue serve` (which keeps the model loaded) and writes the answer as a
-- tab-separated file (`--result`). REAPER's Lua has no sockets, so the client runs as a separate
-- process started with reaper.ExecProcess(cmd, -1), which returns at once, and the answer file is
-- polled with reaper.defer: REAPER never waits. The continuation goes in as a new MIDI item right
-- after the selected one, in one undo point.
--
-- Settings: the defaults below, overridden by the "Segue - Settings" action (stored with
-- reaper.SetExtState("Segue", name, value, true)). Works with REAPER's Lua 5.3 and 5.4.

local M = {}

M.SECTION = "Segue"

M.DEFAULTS = {
  bars = "4",            -- bars to add, 1-64
  variations = "3",      -- continuations per request, 1-16; "Insert another variation" steps through them
  temperature = "0.9",   -- 0 = most likely notes, 1 = as trained, higher = wilder
  seed = "",             -- a number = the same notes every time; empty = new ideas every time
  server = "tcp://127.0.0.1:5555",  -- where `segue serve` listens (ZeroMQ)
  segue = "segue",       -- the segue program; on macOS give its full path (`which segue` in a terminal)
  timeout = "120",       -- seconds to wait for the whole answer
  start_timeout = "20",  -- seconds for `segue client` to start and say so
  temp_dir = "",         -- where clips and answers go; empty = the system's temporary folder
}

-- The settings the "Segue - Settings" dialog shows, in order, with their captions.
M.DIALOG = {
  {"bars", "Bars to add (1-64)"},
  {"variations", "Variations (1-16)"},
  {"temperature", "Temperature (0-5)"},
  {"seed", "Seed (empty = new ideas)"},
  {"server", "Server (ZeroMQ address)"},
  {"segue", "segue program (full path)"},
}

local TICKS = 960
local BAR_TOLERANCE = 1 / 48  -- a length this close past a bar line ends on it, as the server counts (protocol 3.3)

-- Words the musician reads.
M.MSG = {
  no_item = "Select a MIDI item first.\n\nSegue continues the selected item in its style: click an item "
    .. "with notes, then run this action again.",
  not_midi = "The selected item is not MIDI (it holds audio, or nothing).\n\nSelect a MIDI item and run this "
    .. "action again.",
  no_notes = "The selected MIDI item has no notes to continue (muted notes are left out).",
  no_server = "The Segue server is not running (nothing answers at %s).\n\nStart it in a terminal:\n\n"
    .. "    segue serve\n\nthen run this action again.",
  not_started = "`segue client` did not start.\n\nThe Segue program is set to:\n    %s\n\nRun \"Segue - Settings\" "
    .. "and give its full path (in a terminal, `which segue` on macOS and Linux, `where segue` on Windows, "
    .. "prints it).",
  timeout = "Segue did not answer within %d seconds. Is `segue serve` still running? (Settings: timeout)",
  failed = "Segue could not continue the item:\n\n%s",
  nothing_yet = "There is no Segue continuation to vary yet.\n\nSelect a MIDI item and run \"Segue - Continue "
    .. "selected item in style\" first.",
  track_gone = "The track of the last Segue continuation is gone; continue an item again.",
  bad_meter = "Segue works in meters whose lower number is 1, 2, 4, 8, 16 or 32; this item is in %d/%d.",
}

-- --- settings -------------------------------------------------------------------------------------

function M.setting(name)
  if reaper.HasExtState(M.SECTION, name) then
    local value = reaper.GetExtState(M.SECTION, name)
    if value ~= "" or name == "seed" or name == "temp_dir" then
      return value
    end
  end
  return M.DEFAULTS[name]
end

function M.alert(message)
  reaper.ShowMessageBox(message, "Segue", 0)
end

-- --- reading the selected item --------------------------------------------------------------------

-- The beat where the server starts the continuation (docs/protocol.md 3.6): the first bar line at or
-- after the clip's end, a length at most 1/48 beat past a bar line ending on it; or the bar after the
-- last note's onset, once that onset is on the model's grid (1/12 of the meter's beat with the default
-- tokenizer), when that is later: a note a hair before the last bar line starts a new bar.
function M.continuation_start(length, last_onset, numerator, denominator)
  local beats_per_bar = numerator * 4 / denominator
  local full = math.floor(length / beats_per_bar)
  local bars = full
  if length - full * beats_per_bar > BAR_TOLERANCE then
    bars = bars + 1
  end
  local grid = 4 / denominator / 12
  local onset = math.floor(last_onset / grid + 0.5) * grid
  local onset_bar = math.floor(onset / beats_per_bar + 1e-9) + 1
  return beats_per_bar * math.max(1, bars, onset_bar)
end

-- The selected item's notes in beats (quarter notes) from its start, with its tempo, meter and
-- length; or nil and the message to show.
function M.read_selected()
  local item = reaper.GetSelectedMediaItem(0, 0)
  if not item then
    return nil, M.MSG.no_item
  end
  local take = reaper.GetActiveTake(item)
  if not take or not reaper.TakeIsMIDI(take) then
    return nil, M.MSG.not_midi
  end
  local position = reaper.GetMediaItemInfo_Value(item, "D_POSITION")
  local length = reaper.GetMediaItemInfo_Value(item, "D_LENGTH")
  local start_qn = reaper.TimeMap2_timeToQN(0, position)
  local length_qn = reaper.TimeMap2_timeToQN(0, position + length) - start_qn
  local numerator, denominator, tempo = reaper.TimeMap_GetTimeSigAtTime(0, position)
  if math.log(denominator, 2) % 1 ~= 0 or denominator > 32 then
    return nil, string.format(M.MSG.bad_meter, numerator, denominator)
  end
  local _, count = reaper.MIDI_CountEvts(take)
  local notes = {}
  for i = 0, count - 1 do
    local ok, _, muted, start_ppq, end_ppq, channel, pitch, velocity = reaper.MIDI_GetNote(take, i)
    if ok and not muted then
      local start = reaper.MIDI_GetProjQNFromPPQPos(take, start_ppq) - start_qn
      local stop = reaper.MIDI_GetProjQNFromPPQPos(take, end_ppq) - start_qn
      if start > -1e-6 and start < length_qn - 1e-6 and stop > start then  -- only what the item shows
        notes[#notes + 1] = {pitch = pitch, velocity = math.max(1, velocity), start = math.max(0, start),
                             duration = stop - start, channel = channel}
      end
    end
  end
  if #notes == 0 then
    return nil, M.MSG.no_notes
  end
  local last_onset = 0
  for _, note in ipairs(notes) do
    last_onset = math.max(last_onset, note.start)
  end
  local beats_per_bar = numerator * 4 / denominator
  return {
    item = item, track = reaper.GetMediaItem_Track(item), notes = notes, tempo = tempo,
    numerator = numerator, denominator = denominator, start_qn = start_qn, length = length_qn,
    beats_per_bar = beats_per_bar,
    offset = M.continuation_start(length_qn, last_onset, numerator, denominator),
  }
end

-- --- writing the .mid ------------------------------------------------------------------------------

local function vlq(value)
  local bytes = {value & 0x7F}
  value = value >> 7
  while value > 0 do
    table.insert(bytes, 1, (value & 0x7F) | 0x80)
    value = value >> 7
  end
  return string.char(table.unpack(bytes))
end

local function chunk(kind, body)
  return kind .. string.pack(">I4", #body) .. body
end

local function track_chunk(events, end_tick)
  table.sort(events, function(a, b)
    if a.tick ~= b.tick then return a.tick < b.tick end
    return a.order < b.order
  end)
  local parts, now = {}, 0
  for _, event in ipairs(events) do
    parts[#parts + 1] = vlq(event.tick - now) .. event.data
    now = event.tick
  end
  parts[#parts + 1] = vlq(math.max(0, end_tick - now)) .. "\xFF\x2F\x00"
  return chunk("MTrk", table.concat(parts))
end

-- A format-1 .mid: a tempo-and-meter track, then one track per MIDI channel the notes use (channel
-- 10 is drums to the server). Returns the channels in track order: the answer's `track` k is channels[k + 1].
function M.write_mid(path, clip)
  local by_channel, channels = {}, {}
  for _, note in ipairs(clip.notes) do
    if not by_channel[note.channel] then
      by_channel[note.channel] = {}
      channels[#channels + 1] = note.channel
    end
    table.insert(by_channel[note.channel], note)
  end
  table.sort(channels)
  local end_tick = math.floor(clip.length * TICKS + 0.5)
  local microseconds = math.floor(60000000 / clip.tempo + 0.5)
  local conductor = {
    {tick = 0, order = 0, data = "\xFF\x58\x04" .. string.char(clip.numerator, math.floor(math.log(clip.denominator, 2) + 0.5), 24, 8)},
    {tick = 0, order = 1, data = "\xFF\x51\x03" .. string.pack(">I3", microseconds)},
  }
  local chunks = {chunk("MThd", string.pack(">I2I2I2", 1, #channels + 1, TICKS)), track_chunk(conductor, end_tick)}
  for _, channel in ipairs(channels) do
    local name = "Channel " .. (channel + 1)
    local events = {{tick = 0, order = -1, data = "\xFF\x03" .. vlq(#name) .. name}}
    for _, note in ipairs(by_channel[channel]) do
      local on = math.floor(note.start * TICKS + 0.5)
      local off = math.max(on + 1, math.floor((note.start + note.duration) * TICKS + 0.5))
      events[#events + 1] = {tick = on, order = 1, data = string.char(0x90 | channel, note.pitch, note.velocity)}
      events[#events + 1] = {tick = off, order = 0, data = string.char(0x80 | channel, note.pitch, 0)}
    end
    chunks[#chunks + 1] = track_chunk(events, end_tick)
  end
  local file, problem = io.open(path, "wb")
  if not file then
    return nil, problem
  end
  file:write(table.concat(chunks))
  file:close()
  return channels
end

-- --- the answer file ---------------------------------------------------------------------------------

-- `segue client --result`: one event a line, the type then tab-separated fields (docs/hosts-reaper.md).
function M.parse_result(text)
  local result = {variations = {}, done = {}, finished = nil, error = nil, cancelled = false}
  for line in text:gmatch("[^\n]+") do
    local f = {}
    for field in (line .. "\t"):gmatch("([^\t]*)\t") do
      f[#f + 1] = field
    end
    local kind = f[1]
    if kind == "note" then
      local variation = tonumber(f[2])
      result.variations[variation] = result.variations[variation] or {}
      table.insert(result.variations[variation], {pitch = tonumber(f[3]), velocity = tonumber(f[4]),
        start = tonumber(f[5]), duration = tonumber(f[6]), channel = tonumber(f[7]), track = tonumber(f[8]) or 0})
    elseif kind == "done" then
      result.done[tonumber(f[2])] = {path = f[3], notes = tonumber(f[4])}
    elseif kind == "finished" then
      result.finished = tonumber(f[2])
    elseif kind == "error" then
      result.error = {code = f[2], message = f[3] or ""}
    elseif kind == "cancelled" then
      result.cancelled = true
    end
  end
  return result
end

local function read_file(path)
  local file = io.open(path, "r")
  if not file then
    return nil
  end
  local text = file:read("a")
  file:close()
  return text
end

local function exists(path)
  local file = io.open(path, "r")
  if file then
    file:close()
    return true
  end
  return false
end

-- --- running the client -------------------------------------------------------------------------------

local function quote(text)
  return '"' .. text .. '"'
end

local function number(value)
  local text = string.format("%.6f", value):gsub("0+$", ""):gsub("%.$", "")
  return text
end

function M.temp_dir()
  local base = M.setting("temp_dir")
  if base == "" then
    base = os.getenv("TMPDIR") or os.getenv("TEMP") or os.getenv("TMP") or "/tmp"
  end
  local dir = base:gsub("[/\\]$", "") .. "/segue-reaper"
  reaper.RecursiveCreateDirectory(dir, 0)
  return dir
end

-- The command line for `segue client continue`; `job` holds the clip file, its length and the answer file.
function M.command(job)
  local program = M.setting("segue")
  if exists(program) then
    program = quote(program)  -- a path, maybe with spaces; anything else is a command line as typed
  end
  local parts = {program, "client", "continue", quote(job.mid), "--length", number(job.length),
                 "--bars", job.bars, "--variations", job.variations, "--temperature", M.setting("temperature"),
                 "--server", quote(M.setting("server")), "--result", quote(job.result)}
  local seed = M.setting("seed")
  if seed ~= "" then
    parts[#parts + 1] = "--seed"
    parts[#parts + 1] = seed
  end
  return table.concat(parts, " ")
end

-- Start the client without waiting and call on_result(result) once its answer file is complete;
-- every failure becomes a message.
function M.run_client(job, on_result)
  os.remove(job.result)
  os.remove(job.result .. ".part")
  local command = M.command(job)
  local started = reaper.time_precise()
  local start_timeout = tonumber(M.setting("start_timeout")) or 20
  local timeout = tonumber(M.setting("timeout")) or 120
  local windows = reaper.GetOS():match("Win") ~= nil
  reaper.ExecProcess(command, windows and -2 or -1)  -- returns at once (-2: no console window on Windows)
  local function poll()
    local text = exists(job.result) and read_file(job.result)
    if text then
      local result = M.parse_result(text)
      if result.error then
        if result.error.code == "unreachable" then
          M.alert(string.format(M.MSG.no_server, M.setting("server")))
        else
          M.alert(string.format(M.MSG.failed, result.error.message))
        end
      elseif result.finished then
        on_result(result)
      elseif result.cancelled then
        M.alert(string.format(M.MSG.failed, "the request was cancelled"))
      end
      return
    end
    local waited = reaper.time_precise() - started
    if waited > start_timeout and not exists(job.result .. ".part") then
      M.alert(string.format(M.MSG.not_started, M.setting("segue")))
      return
    end
    if waited > timeout then
      M.alert(string.format(M.MSG.timeout, timeout))
      return
    end
    reaper.defer(poll)
  end
  reaper.defer(poll)
end

-- --- remembering the last continuation (for "Insert another variation") ----------------------------

local STATE_KEYS = {"mid", "result", "length", "bars", "variations", "beats_per_bar", "start_qn", "offset",
                    "track", "channels", "index", "item", "item_position"}

function M.save_state(job)
  for _, key in ipairs(STATE_KEYS) do
    reaper.SetExtState(M.SECTION, "last_" .. key, tostring(job[key] or ""), false)
  end
end

function M.load_state()
  if not reaper.HasExtState(M.SECTION, "last_result") then
    return nil
  end
  local job = {}
  for _, key in ipairs(STATE_KEYS) do
    local value = reaper.GetExtState(M.SECTION, "last_" .. key)
    job[key] = tonumber(value) or value
  end
  job.channels = tostring(job.channels)
  return job
end

local function guid_of_track(track)
  return reaper.GetTrackGUID(track)
end

local function find_track(guid)
  for i = 0, reaper.CountTracks(0) - 1 do
    local track = reaper.GetTrack(0, i)
    if reaper.GetTrackGUID(track) == guid then
      return track
    end
  end
  return nil
end

local function item_guid(item)
  local _, guid = reaper.GetSetMediaItemInfo_String(item, "GUID", "", false)
  return guid
end

local function find_item(track, guid)
  for i = 0, reaper.CountTrackMediaItems(track) - 1 do
    local item = reaper.GetTrackMediaItem(track, i)
    if item_guid(item) == guid then
      return item
    end
  end
  return nil
end

-- --- inserting the continuation ----------------------------------------------------------------------

-- Put variation `index` (from 1) of `result` in a new MIDI item right after the clip, as one undo
-- point. The variation inserted before it is replaced when it still sits where it was put (moved
-- elsewhere, it is kept).
function M.insert(job, result, index)
  local track = find_track(job.track)
  if not track then
    M.alert(M.MSG.track_gone)
    return false
  end
  local channels = {}
  for channel in tostring(job.channels):gmatch("%d+") do
    channels[#channels + 1] = tonumber(channel)
  end
  local first = job.start_qn + job.offset
  local last = first + job.bars * job.beats_per_bar
  local count = result.finished or job.variations
  local name = string.format("Segue %d of %d", index, count)
  reaper.Undo_BeginBlock()
  reaper.PreventUIRefresh(1)
  local previous = job.item ~= "" and find_item(track, job.item) or nil
  if previous and math.abs(reaper.GetMediaItemInfo_Value(previous, "D_POSITION") - job.item_position) < 1e-6 then
    reaper.DeleteTrackMediaItem(track, previous)
  end
  local item = reaper.CreateNewMIDIItemInProj(track, first, last, true)
  local take = reaper.GetActiveTake(item)
  for _, note in ipairs(result.variations[index - 1] or {}) do
    local start = job.start_qn + note.start
    local stop = math.min(start + note.duration, last)
    if start >= first - 1e-6 and start < last then
      local channel = channels[note.track + 1] or note.channel
      reaper.MIDI_InsertNote(take, false, false, reaper.MIDI_GetPPQPosFromProjQN(take, start),
        reaper.MIDI_GetPPQPosFromProjQN(take, stop), channel, note.pitch, note.velocity, true)
    end
  end
  reaper.MIDI_Sort(take)
  reaper.GetSetMediaItemTakeInfo_String(take, "P_NAME", name, true)
  reaper.SelectAllMediaItems(0, false)
  reaper.SetMediaItemSelected(item, true)
  reaper.PreventUIRefresh(-1)
  reaper.Undo_EndBlock("Segue: continue in style (" .. name .. ")", -1)
  reaper.UpdateArrange()
  job.index = index
  job.variations = count
  job.item = item_guid(item)
  job.item_position = reaper.GetMediaItemInfo_Value(item, "D_POSITION")
  M.save_state(job)
  return true
end

-- --- the actions ---------------------------------------------------------------------------------------

local function settings_numbers()
  local bars = math.tointeger(tonumber(M.setting("bars")))
  local variations = math.tointeger(tonumber(M.setting("variations")))
  return bars or 4, variations or 1
end

-- A name for this run's files that no earlier run used (REAPER loads this file afresh for every action).
local function new_stamp(dir)
  local base = string.format("%d-%d", os.time(), math.floor(reaper.time_precise() * 1000) % 1000000000)
  local stamp, n = base, 0
  while exists(dir .. "/answer-" .. stamp .. ".tsv") or exists(dir .. "/clip-" .. stamp .. ".mid") do
    n = n + 1
    stamp = base .. "-" .. n
  end
  return stamp
end

function M.continue_selected()
  local clip, problem = M.read_selected()
  if not clip then
    M.alert(problem)
    return
  end
  local dir = M.temp_dir()
  local stamp = new_stamp(dir)
  local bars, variations = settings_numbers()
  local job = {
    mid = dir .. "/clip-" .. stamp .. ".mid", result = dir .. "/answer-" .. stamp .. ".tsv",
    length = clip.length, bars = bars, variations = variations, beats_per_bar = clip.beats_per_bar,
    start_qn = clip.start_qn, offset = clip.offset, track = guid_of_track(clip.track), index = 0, item = "",
    item_position = 0,
  }
  local channels, failure = M.write_mid(job.mid, clip)
  if not channels then
    M.alert(string.format(M.MSG.failed, "cannot write " .. job.mid .. " (" .. tostring(failure) .. ")"))
    return
  end
  job.channels = table.concat(channels, ",")
  M.run_client(job, function(result)
    M.insert(job, result, 1)
  end)
end

function M.another_variation()
  local job = M.load_state()
  if not job then
    M.alert(M.MSG.nothing_yet)
    return
  end
  if job.index < job.variations then
    local text = read_file(job.result)
    if text then
      M.insert(job, M.parse_result(text), job.index + 1)
      return
    end
  end
  job.bars, job.variations = settings_numbers()  -- all used: ask for new ones, with the settings of now
  local dir = M.temp_dir()
  job.result = dir .. "/answer-" .. new_stamp(dir) .. ".tsv"
  M.run_client(job, function(result)
    M.insert(job, result, 1)
  end)
end

function M.edit_settings()
  local captions, values = {}, {}
  for i, entry in ipairs(M.DIALOG) do
    captions[i] = entry[2]
    values[i] = M.setting(entry[1])
  end
  local ok, answer = reaper.GetUserInputs("Segue settings", #M.DIALOG,
    table.concat(captions, ",") .. ",extrawidth=220", table.concat(values, ","))
  if not ok then
    return false
  end
  local fields = {}
  for field in (answer .. ","):gmatch("([^,]*),") do
    fields[#fields + 1] = field:match("^%s*(.-)%s*$")
  end
  local checks = {
    bars = function(v) local n = math.tointeger(tonumber(v)) return n and n >= 1 and n <= 64 end,
    variations = function(v) local n = math.tointeger(tonumber(v)) return n and n >= 1 and n <= 16 end,
    temperature = function(v) local n = tonumber(v) return n and n >= 0 and n <= 5 end,
    seed = function(v) return v == "" or (math.tointeger(tonumber(v)) or -1) >= 0 end,
    server = function(v) return v ~= "" end,
    segue = function(v) return v ~= "" end,
  }
  for i, entry in ipairs(M.DIALOG) do
    if not checks[entry[1]](fields[i] or "") then
      M.alert(string.format("\"%s\" is not a valid value for %s; nothing was changed.", fields[i] or "", entry[2]))
      return false
    end
  end
  for i, entry in ipairs(M.DIALOG) do
    reaper.SetExtState(M.SECTION, entry[1], fields[i], true)
  end
  return true
end


return M
