#!/usr/bin/env bash
# The screenshot in docs/hosts-plugin.md: the Standalone under Xvfb with a clip, after Continue.
#
#     segue serve &                                   # port 9100, the shipped model
#     xvfb-run -a -s "-screen 0 1100x800x24" juce_stub/test_host/screenshot.sh docs/hosts-plugin-standalone.png
#
# Needs xdotool (apt-get install xdotool) and Pillow; run from the repository root after a build.
set -euo pipefail
out="${1:-hosts-plugin-standalone.png}"
app=juce_stub/build/Segue_artefacts/Debug/Standalone/Segue
"$app" docs/examples/reel.mid > /dev/null 2>&1 &
pid=$!
trap 'kill $pid 2> /dev/null || true' EXIT
sleep 6
wid=$(xdotool search --name "^Segue$" | head -1)
eval "$(xdotool getwindowgeometry --shell "$wid")"
xdotool mousemove $((X + 608)) $((Y + 350)) click 1   # Continue (the editor is 800x540 under a 28-pixel title bar)
sleep 3
xdotool mousemove $((X + 640)) $((Y + 520))           # away from the tiles' tooltips
sleep 1
python3 -c "
from PIL import ImageGrab
ImageGrab.grab(xdisplay='$DISPLAY').crop(($X, $Y, $X + $WIDTH, $Y + $HEIGHT)).save('$out')"
echo "wrote $out"
