-- Segue in Ardour, headless (tests/test_ardour_plugin.py runs this; see docs/hosts-plugin.md):
--
--     SEGUE_ARDOUR_SESSION=/tmp/s SEGUE_RECORD_SAMPLES=... SEGUE_PLAY_SAMPLES=... ardour7-lua session.lua
--
-- On the "None (Dummy)" backend at 48 kHz, 120 BPM, 4/4:
--  1. a "Keys" track plays a fixed sequence (the "Segue Test Keys" Lua DSP) into the "Clip" track,
--     which records it: a MIDI region, as if a musician had played it;
--  2. Segue (VST3) is inserted on "Clip"; the transport goes back to 0 and rolls; the region plays
--     through Segue (a note 0 in it presses Continue) and the "Result" track records what Segue
--     puts out: the clip passed through and the continuation.
-- Prints tab-separated PARAM lines for Segue's parameters and REGION/NOTE lines (beats:ticks) for the regions.

local session_dir = assert (os.getenv ("SEGUE_ARDOUR_SESSION"), "set SEGUE_ARDOUR_SESSION")
local record_samples = assert (tonumber (os.getenv ("SEGUE_RECORD_SAMPLES")), "set SEGUE_RECORD_SAMPLES")
local play_samples = assert (tonumber (os.getenv ("SEGUE_PLAY_SAMPLES")), "set SEGUE_PLAY_SAMPLES")
local params = os.getenv ("SEGUE_PARAMS") or "" -- "index=normalized value,..."

AudioEngine:set_backend ("None (Dummy)", "", "")
assert (create_session (session_dir, "segue", 48000), "could not create the session")

local function midi_track (name)
	return Session:new_midi_track (ARDOUR.ChanCount (ARDOUR.DataType ("midi"), 1), ARDOUR.ChanCount (ARDOUR.DataType ("midi"), 1),
		false, ARDOUR.PluginInfo (), nil, nil, 1, name, ARDOUR.PresentationInfo.max_order, ARDOUR.TrackMode.Normal, true):front ()
end

local function feed (into, from)
	into:input ():disconnect_all (nil)
	if from then
		assert (into:input ():connect (into:input ():nth (0), from:output ():nth (0):name (), nil) == 0)
	end
end

local function record (track, samples)
	track:rec_enable_control ():set_value (1, PBD.GroupControlDisposition.NoGroup)
	Session:request_locate (0, false, ARDOUR.LocateTransportDisposition.MustStop, ARDOUR.TransportRequestSource.TRS_UI)
	while Session:transport_sample () ~= 0 do ARDOUR.LuaAPI.usleep (10000) end
	Session:maybe_enable_record (false)
	Session:request_roll (ARDOUR.TransportRequestSource.TRS_UI)
	while Session:transport_sample () < samples do ARDOUR.LuaAPI.usleep (10000) end
	Session:request_stop (false, false, ARDOUR.TransportRequestSource.TRS_UI)
	while Session:transport_rolling () do ARDOUR.LuaAPI.usleep (10000) end
	ARDOUR.LuaAPI.usleep (500000) -- the butler turns the capture into a region
	Session:disable_record (false, false)
	track:rec_enable_control ():set_value (0, PBD.GroupControlDisposition.NoGroup)
end

local function say (...) print (table.concat ({ ... }, "\t")) end

local function dump (track)
	for r in track:playlist ():region_list ():iter () do
		say ("REGION", track:name (), r:position ():str ())
		for n in ARDOUR.LuaAPI.note_list (r:to_midiregion ():model ()):iter () do
			say ("NOTE", track:name (), n:time ():str (), n:note (), n:velocity (), n:length ():str ())
		end
	end
end

local keys, clip, result = midi_track ("Keys"), midi_track ("Clip"), midi_track ("Result")
local player = ARDOUR.LuaAPI.new_luaproc (Session, "Segue Test Keys")
assert (not player:isnil (), "the Segue Test Keys DSP script is not in the scripts folder")
assert (keys:add_processor_by_index (player, 0, nil, true) == 0)
feed (result, nil)

-- 1. Record the clip.
feed (clip, keys)
record (clip, record_samples)
feed (clip, nil)
dump (clip)

-- 2. Play it through Segue and record what comes out.
local segue = ARDOUR.LuaAPI.new_plugin (Session, "Segue", ARDOUR.PluginType.VST3, "")
assert (not segue:isnil (), "Ardour does not know the Segue VST3 (run ardour-vst3-scanner on it first)")
assert (clip:add_processor_by_index (segue, 0, nil, true) == 0)
for index, value in params:gmatch ("(%d+)=([%d.]+)") do
	assert (ARDOUR.LuaAPI.set_processor_param (segue, tonumber (index), tonumber (value)))
end
local plugin = segue:to_insert ():plugin (0)
for i = 0, plugin:parameter_count () - 1 do
	say ("PARAM", i, plugin:parameter_label (i), (ARDOUR.LuaAPI.get_processor_param (segue, i)))
end
feed (result, clip)
record (result, play_samples)
dump (result)

Session:save_state ("", false, false, false, false, false)
close_session ()
quit ()
