ardour { ["type"] = "dsp", name = "Segue Test Keys", category = "Utility", license = "MIT", author = "Segue",
	description = [[Plays a fixed MIDI sequence in time with the transport, like a musician on a keyboard.
Used by tests/test_ardour_plugin.py to record the clip Segue continues; the test fills in EVENTS.]] }

-- {sample, status, data1, data2}, sorted by sample
local events = { --EVENTS-- }

function dsp_ioconfig () return { { midi_in = 1, midi_out = 1, audio_in = 0, audio_out = 0 } } end

function dsp_run (_, _, n_samples)
	if not Session:transport_rolling () then return end
	local pos = Session:transport_sample ()
	local m = 1
	for _, e in ipairs (events) do
		if e[1] >= pos and e[1] < pos + n_samples then
			midiout[m] = { time = e[1] - pos + 1, data = { e[2], e[3], e[4] } }
			m = m + 1
		end
	end
end
