#pragma once

#include "SegueTypes.h"

#include <juce_core/juce_core.h>

#include <array>
#include <optional>
#include <vector>

namespace segue
{

/** A note of a clip, in beats from the clip start (the protocol's units). */
struct ClipNote
{
    int pitch = 60;
    int velocity = 100;
    double start = 0.0;
    double duration = 1.0;
    int channel = 0;
};

/** The clip sent with a request: notes in beats from its start, its place on the song timeline. */
struct Clip
{
    std::vector<ClipNote> notes;
    double tempo = 120.0;
    int numerator = 4;
    int denominator = 4;
    double lengthBeats = 4.0; // whole bars
    double startPpq = 0.0;    // song position of the clip start; the continuation starts at startPpq + lengthBeats
    int program = 0;
    bool isDrum = false;
    juce::String source;      // "played" or the dropped file's name

    int mainChannel() const;   // the channel most notes use (the continuation is played on it)
};

/** Where a Continue press at `at` puts the clip's end (and so the continuation's start):
    the bar line at or after the press, except that a press in the first beat of a bar in which
    nothing was played yet ends the clip at that bar's start (a press right on the clip's last bar
    line, or just after it). */
double clipEndForTrigger (const TransportInfo& at, bool notePlayedInThisBar);

/** Bar line at or before `ppq` on the grid of `at` (its bar start and meter). */
double barStartAtOrBefore (const TransportInfo& at, double ppq);

/** The notes played through the plugin, with their song positions (bridge thread only). */
class ClipCapture
{
public:
    void noteOn (double ppq, int channel, int pitch, int velocity);
    void noteOff (double ppq, int channel, int pitch);
    void programChange (int channel, int program);
    /** The transport jumped to `ppq`: what was captured from there on is forgotten (a loop plays it again). */
    void jumpedTo (double ppq);
    /** The transport stopped at `ppq`: held notes end there. */
    void stoppedAt (double ppq);
    /** Drop notes that ended before `ppq` (keeps memory bounded). */
    void forgetBefore (double ppq);

    bool anyNoteOnIn (double fromPpq, double toPpq) const;

    /** The notes whose start lies in [startPpq, endPpq); notes still held end at `nowPpq`. */
    Clip clipBetween (double startPpq, double endPpq, double nowPpq, const TransportInfo& at) const;

    int size() const { return (int) closed.size(); }

private:
    struct Held { double startPpq = -1.0; int velocity = 0; };
    struct Played { double startPpq, endPpq; int pitch, velocity, channel; };

    std::vector<Played> closed;
    std::array<std::array<Held, 128>, 16> held {};
    std::array<int, 16> programs {};
};

/** Reads a Standard MIDI File into a clip: every track's notes, the first tempo and meter, the
    length rounded up to whole bars. Empty optional and a sentence in `error` when it cannot. */
std::optional<Clip> readMidiFileClip (const juce::File& file, juce::String& error);

/** The request settings a continue carries besides its clip. */
struct RequestSettings
{
    int clipBars = 4;      // how many bars before the press are the clip
    int bars = 4;
    int variations = 1;
    double temperature = 0.9;
    int key = -1;          // pitch class 0-11, -1 = no key lock
    juce::String scale;    // with key: a name from SEGUE_SCALES
    int seed = -1;         // -1 = a fresh random seed
};
/** The clip object of a request (docs/protocol.md section 3.3), ASCII only. Two clips with the same
    text are the same prompt to the server, so this is also what "the notes changed" compares. */
std::string clipJson (const Clip& clip);
/** The continue request's JSON (ASCII only: any piece of it is valid UTF-8 on its own). The plugin
    sends this very text as its `prepare` too: the server reads only `clip` (and `model`) of a prepare. */
std::string continueJson (const Clip& clip, const RequestSettings& settings);

} // namespace segue
