#include "ClipCapture.h"

#include "segue_protocol.h"

#include <juce_audio_basics/juce_audio_basics.h>

#include <algorithm>
#include <cmath>
#include <cstdio>

namespace segue
{

namespace
{
constexpr double minDuration = 1.0 / 32.0; // a note-off on the same tick as its note-on still sounds
constexpr double epsilon = 1e-9;
constexpr double earlyTolerance = 1.0 / 24.0; // half of the default tokenizer's 1/12-beat grid
} // namespace

int Clip::mainChannel() const
{
    std::array<int, 16> count {};
    for (const auto& n : notes)
        ++count[(size_t) juce::jlimit (0, 15, n.channel)];
    return (int) std::distance (count.begin(), std::max_element (count.begin(), count.end()));
}

double barStartAtOrBefore (const TransportInfo& at, double ppq)
{
    const double barLen = at.beatsPerBar();
    const double bars = std::floor ((ppq - at.barStartPpq) / barLen + epsilon);
    return at.barStartPpq + bars * barLen;
}

double clipEndForTrigger (const TransportInfo& at, bool notePlayedInThisBar)
{
    const double barStart = barStartAtOrBefore (at, at.ppq);
    if (at.ppq - barStart < 1.0 - epsilon && ! notePlayedInThisBar)
        return barStart;
    return barStart + at.beatsPerBar();
}

// --- capture ---------------------------------------------------------------------------------------

void ClipCapture::noteOn (double ppq, int channel, int pitch, int velocity)
{
    auto& h = held[(size_t) channel][(size_t) pitch];
    if (h.startPpq >= 0.0) // a second note-on of a held key ends the first
        noteOff (ppq, channel, pitch);
    h = Held { ppq, velocity };
}

void ClipCapture::noteOff (double ppq, int channel, int pitch)
{
    auto& h = held[(size_t) channel][(size_t) pitch];
    if (h.startPpq < 0.0)
        return;
    closed.push_back (Played { h.startPpq, std::max (ppq, h.startPpq + minDuration), pitch, h.velocity, channel });
    h = Held {};
    if ((int) closed.size() > SEGUE_MAX_NOTES_PER_CLIP * 2)
        closed.erase (closed.begin(), closed.begin() + SEGUE_MAX_NOTES_PER_CLIP);
}

void ClipCapture::programChange (int channel, int program)
{
    programs[(size_t) channel] = program;
}

void ClipCapture::jumpedTo (double ppq)
{
    for (auto& channel : held)
        for (auto& h : channel)
            h = Held {};
    closed.erase (std::remove_if (closed.begin(), closed.end(),
                                  [ppq] (const Played& p) { return p.startPpq >= ppq - epsilon; }),
                  closed.end());
}

void ClipCapture::stoppedAt (double ppq)
{
    for (int c = 0; c < 16; ++c)
        for (int p = 0; p < 128; ++p)
            if (held[(size_t) c][(size_t) p].startPpq >= 0.0)
                noteOff (std::max (ppq, held[(size_t) c][(size_t) p].startPpq), c, p);
}

void ClipCapture::forgetBefore (double ppq)
{
    closed.erase (std::remove_if (closed.begin(), closed.end(), [ppq] (const Played& p) { return p.endPpq < ppq; }),
                  closed.end());
}

bool ClipCapture::anyNoteOnIn (double fromPpq, double toPpq) const
{
    const auto inside = [&] (double p) { return p >= fromPpq - epsilon && p < toPpq; };
    for (const auto& p : closed)
        if (inside (p.startPpq))
            return true;
    for (const auto& channel : held)
        for (const auto& h : channel)
            if (h.startPpq >= 0.0 && inside (h.startPpq))
                return true;
    return false;
}

Clip ClipCapture::clipBetween (double startPpq, double endPpq, double nowPpq, const TransportInfo& at) const
{
    Clip clip;
    clip.tempo = juce::jlimit (10.0, 400.0, at.bpm);
    clip.numerator = at.numerator;
    clip.denominator = at.denominator;
    clip.startPpq = startPpq;
    clip.lengthBeats = endPpq - startPpq;
    clip.source = "played";

    // A note played a hair early belongs to the bar after it: the window is shifted back by half the
    // model's grid step, so the first note of the next pass does not lengthen the clip by a bar.
    const auto add = [&] (double s, double e, int pitch, int velocity, int channel) {
        if (s < startPpq - earlyTolerance || s >= endPpq - earlyTolerance)
            return;
        clip.notes.push_back (ClipNote { pitch, juce::jlimit (1, 127, velocity), std::max (0.0, s - startPpq),
                                         std::max (minDuration, e - s), channel });
    };
    for (const auto& p : closed)
        add (p.startPpq, p.endPpq, p.pitch, p.velocity, p.channel);
    for (int c = 0; c < 16; ++c)
        for (int p = 0; p < 128; ++p)
            if (const auto& h = held[(size_t) c][(size_t) p]; h.startPpq >= 0.0)
                add (h.startPpq, std::max (nowPpq, h.startPpq + minDuration), p, h.velocity, c);

    std::sort (clip.notes.begin(), clip.notes.end(), [] (const ClipNote& a, const ClipNote& b) {
        return a.start != b.start ? a.start < b.start : a.pitch < b.pitch;
    });
    if ((int) clip.notes.size() > SEGUE_MAX_NOTES_PER_CLIP) // keep the latest notes
        clip.notes.erase (clip.notes.begin(), clip.notes.end() - SEGUE_MAX_NOTES_PER_CLIP);

    const int channel = clip.mainChannel();
    clip.isDrum = ! clip.notes.empty() && channel == 9;
    clip.program = programs[(size_t) channel];
    return clip;
}

// --- a dropped .mid ----------------------------------------------------------------------------------

std::optional<Clip> readMidiFileClip (const juce::File& file, juce::String& error)
{
    juce::FileInputStream stream (file);
    juce::MidiFile midi;
    if (! stream.openedOk())
    {
        error = "Cannot open " + file.getFileName() + ".";
        return std::nullopt;
    }
    if (file.getSize() > 8 * 1024 * 1024 || ! midi.readFrom (stream))
    {
        error = file.getFileName() + " is not a MIDI file Segue can read.";
        return std::nullopt;
    }
    const double tpq = midi.getTimeFormat();
    if (tpq <= 0)
    {
        error = file.getFileName() + " counts time in SMPTE frames; save it with beats (PPQ) instead.";
        return std::nullopt;
    }

    Clip clip;
    clip.source = file.getFileName();
    juce::MidiMessageSequence tempos, meters;
    midi.findAllTempoEvents (tempos);
    midi.findAllTimeSigEvents (meters);
    if (tempos.getNumEvents() > 0)
        clip.tempo = juce::jlimit (10.0, 400.0, 60.0 / tempos.getEventPointer (0)->message.getTempoSecondsPerQuarterNote());
    if (meters.getNumEvents() > 0)
        meters.getEventPointer (0)->message.getTimeSignatureInfo (clip.numerator, clip.denominator);

    double lastEnd = 0.0;
    bool programSeen = false;
    for (int t = 0; t < midi.getNumTracks(); ++t)
    {
        juce::MidiMessageSequence track (*midi.getTrack (t));
        track.updateMatchedPairs();
        for (auto* event : track)
        {
            const auto& m = event->message;
            if (m.isProgramChange() && ! programSeen)
            {
                clip.program = m.getProgramChangeNumber();
                programSeen = true;
            }
            if (! m.isNoteOn())
                continue;
            const double start = m.getTimeStamp() / tpq;
            const double end = event->noteOffObject != nullptr ? event->noteOffObject->message.getTimeStamp() / tpq
                                                               : start + 0.25;
            clip.notes.push_back (ClipNote { m.getNoteNumber(), juce::jlimit (1, 127, (int) m.getVelocity()), start,
                                             std::max (minDuration, end - start), m.getChannel() - 1 });
            lastEnd = std::max (lastEnd, end);
        }
    }
    if (clip.notes.empty())
    {
        error = file.getFileName() + " has no notes to continue.";
        return std::nullopt;
    }
    std::sort (clip.notes.begin(), clip.notes.end(), [] (const ClipNote& a, const ClipNote& b) {
        return a.start != b.start ? a.start < b.start : a.pitch < b.pitch;
    });
    if ((int) clip.notes.size() > SEGUE_MAX_NOTES_PER_CLIP)
    {
        error = file.getFileName() + " has " + juce::String ((int) clip.notes.size()) + " notes; at most "
                + juce::String (SEGUE_MAX_NOTES_PER_CLIP) + " can be sent.";
        return std::nullopt;
    }
    const double barLen = clip.numerator * 4.0 / clip.denominator;
    clip.lengthBeats = std::max (1.0, std::ceil (lastEnd / barLen - 1.0 / 48.0)) * barLen;
    clip.isDrum = clip.mainChannel() == 9;
    return clip;
}

// --- the request JSON ----------------------------------------------------------------------------------

namespace
{
void appendNumber (std::string& out, double value)
{
    char buffer[32];
    std::snprintf (buffer, sizeof (buffer), "%.6f", value);
    std::string text (buffer);
    while (! text.empty() && text.back() == '0')
        text.pop_back();
    if (! text.empty() && text.back() == '.')
        text.pop_back();
    out += (text == "-0" ? "0" : text);
}

void appendAsciiString (std::string& out, const juce::String& value)
{
    out += '"';
    for (auto t = value.getCharPointer(); ! t.isEmpty();)
    {
        const auto c = t.getAndAdvance();
        if (c == '"' || c == '\\')
        {
            out += '\\';
            out += (char) c;
        }
        else if (c >= 32 && c < 127)
        {
            out += (char) c;
        }
        else
        {
            char buffer[8];
            std::snprintf (buffer, sizeof (buffer), "\\u%04x", (unsigned) (c & 0xffff));
            out += buffer;
        }
    }
    out += '"';
}
} // namespace

std::string clipJson (const Clip& clip)
{
    std::string json;
    json.reserve (160 + clip.notes.size() * 24);
    json += "{\"notes\":[";
    for (size_t i = 0; i < clip.notes.size(); ++i)
    {
        const auto& n = clip.notes[i];
        json += i == 0 ? "[" : ",[";
        json += std::to_string (n.pitch) + "," + std::to_string (n.velocity) + ",";
        appendNumber (json, n.start);
        json += ",";
        appendNumber (json, n.duration);
        json += "," + std::to_string (clip.isDrum ? 9 : juce::jlimit (0, 15, n.channel)) + "]";
    }
    json += "],\"tempo\":";
    appendNumber (json, clip.tempo);
    json += ",\"time_signature\":[" + std::to_string (clip.numerator) + "," + std::to_string (clip.denominator) + "]";
    json += ",\"length\":";
    appendNumber (json, clip.lengthBeats);
    json += ",\"program\":" + std::to_string (clip.program);
    json += std::string (",\"is_drum\":") + (clip.isDrum ? "true" : "false") + "}";
    return json;
}

std::string continueJson (const Clip& clip, const RequestSettings& settings)
{
    std::string json = "{\"clip\":" + clipJson (clip);
    json += ",\"bars\":" + std::to_string (settings.bars);
    json += ",\"variations\":" + std::to_string (settings.variations);
    json += ",\"temperature\":";
    appendNumber (json, settings.temperature);
    if (settings.seed >= 0)
        json += ",\"seed\":" + std::to_string (settings.seed);
    json += ",\"constraints\":{";
    if (settings.key >= 0 && ! clip.isDrum)
    {
        json += "\"key\":" + std::to_string (settings.key) + ",\"scale\":";
        appendAsciiString (json, settings.scale.isEmpty() ? juce::String ("major") : settings.scale);
    }
    json += "}}";
    return json;
}

} // namespace segue
