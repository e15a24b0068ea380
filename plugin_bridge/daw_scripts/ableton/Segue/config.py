"""Settings of the Segue Remote Script. Edit the values below, save, and restart Live (or pick the
control surface again in Settings > Link, Tempo & MIDI) to apply them; docs/hosts-live.md explains each."""

from __future__ import annotations

# Where `segue serve` listens for OSC (its --osc-port; 9100 unless you changed it).
SERVER_HOST = "127.0.0.1"
SERVER_PORT = 9100

# What to ask for. None = the model's own default (usually 4 bars, temperature 0.9).
BARS: int | None = 4             # bars to add, 1-64
VARIATIONS: int | None = 3       # continuations per request, 1-16; "another variation" steps through them
TEMPERATURE: float | None = 0.9  # 0 = most likely notes, 1 = as trained, higher = wilder
SEED: int | None = None          # a number = the same notes every time; None = new ideas every time
MODEL: str | None = None         # a model name from `segue client hello`; None = the server's default

# The triggers: MIDI from the controller picked as this control surface's Input. A control change
# with a value above 0, or a note-on, on TRIGGER_CHANNEL (0-15, i.e. MIDI channel 1-16) fires the action.
# Set a number to None to leave that trigger out.
TRIGGER_CHANNEL = 15                 # MIDI channel 16
CONTINUE_CC: int | None = 102     # continue the selected clip
VARIATION_CC: int | None = 103    # put in the next variation (or ask for new ones)
CONTINUE_NOTE: int | None = None  # e.g. 36 for a pad sending C1
VARIATION_NOTE: int | None = None

# Send the clip shown in the Clip View to the server as soon as it is selected (and again after its
# notes, loop, markers or meter are edited), so that the server prefills it and draws its continuation
# up to the first note while you listen: the continue trigger then starts at once. False: send the
# clip only on the trigger.
PREPARE = True

# How long to wait: for the server's hello (it answers at once when running), and for any event
# while a continuation is being generated.
HELLO_TIMEOUT = 2.0
SILENCE_TIMEOUT = 60.0
