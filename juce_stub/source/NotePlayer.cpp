#include "NotePlayer.h"

#include <algorithm>
#include <cmath>

namespace segue
{

void NotePlayer::add (const ScheduledNote& note) noexcept
{
    if (numNotes >= maxNotes)
    {
        notesDroppedFull.fetch_add (1, std::memory_order_relaxed);
        return;
    }
    // Notes arrive in onset order (per variation), so this insertion usually moves nothing.
    int i = numNotes;
    while (i > 0 && notes[(size_t) i - 1].note.onPpq > note.onPpq)
    {
        notes[(size_t) i] = notes[(size_t) i - 1];
        --i;
    }
    notes[(size_t) i] = Stored { note, true };
    ++numNotes;
    ++numFresh;
}

void NotePlayer::clear() noexcept
{
    numNotes = 0;
    numFresh = 0;
    clearPending = true;
}

void NotePlayer::push (int sample, int phase, std::uint8_t status, std::uint8_t pitch, std::uint8_t velocity) noexcept
{
    if (numEvents < maxEventsPerBlock)
    {
        events[(size_t) numEvents] = OutEvent { sample, phase, numEvents, status, pitch, velocity };
        ++numEvents;
    }
}

void NotePlayer::allNotesOff (juce::MidiBuffer& out, int sample) noexcept
{
    for (int i = 0; i < numSounding; ++i)
    {
        const auto& s = sounding[(size_t) i];
        out.addEvent (juce::MidiMessage::noteOff (s.channel + 1, s.pitch), sample);
    }
    numSounding = 0;
}

void NotePlayer::start (const ScheduledNote& n, int sample, double ppq0, double samplesPerBeat, int numSamples) noexcept
{
    const auto noteOn = (std::uint8_t) (0x90 | n.channel);
    const auto noteOff = (std::uint8_t) (0x80 | n.channel);

    // The same key already sounding (overlapping generated notes): end it right before restarting it.
    for (int i = 0; i < numSounding; ++i)
    {
        if (sounding[(size_t) i].channel == n.channel && sounding[(size_t) i].pitch == n.pitch)
        {
            push (sample, 0, noteOff, n.pitch, 0);
            sounding[(size_t) i] = sounding[(size_t) --numSounding];
            break;
        }
    }
    push (sample, 1, noteOn, n.pitch, std::max<std::uint8_t> (1, n.velocity));

    const double offX = (n.offPpq - ppq0) * samplesPerBeat;
    if (offX < numSamples - 0.5)
    {
        const int offSample = std::clamp ((int) std::floor (offX + 0.5), sample, numSamples - 1);
        push (offSample, 2, noteOff, n.pitch, 0);
    }
    else if (numSounding < maxSounding)
    {
        sounding[(size_t) numSounding++] = Sounding { n.offPpq, n.channel, n.pitch };
    }
    else
    {
        push (std::min (sample, numSamples - 1), 2, noteOff, n.pitch, 0); // no room to hold it: a short note
    }
}

void NotePlayer::render (juce::MidiBuffer& out, double ppq0, double samplesPerBeat, int numSamples,
                         bool playing, bool jumped) noexcept
{
    if (numSamples <= 0)
        return;

    if (clearPending || jumped || ! playing)
    {
        allNotesOff (out, 0);
        clearPending = false;
    }
    if (! playing)
        return;

    numEvents = 0;
    const auto toSample = [&] (double ppq) { return (ppq - ppq0) * samplesPerBeat; };

    // 1. Ends of notes already sounding.
    for (int i = 0; i < numSounding;)
    {
        const double x = toSample (sounding[(size_t) i].offPpq);
        if (x < numSamples - 0.5)
        {
            const int sample = std::clamp ((int) std::floor (x + 0.5), 0, numSamples - 1);
            push (sample, 0, (std::uint8_t) (0x80 | sounding[(size_t) i].channel), sounding[(size_t) i].pitch, 0);
            sounding[(size_t) i] = sounding[(size_t) --numSounding];
        }
        else
        {
            ++i;
        }
    }

    // 2. Notes that arrived after their start had passed: the late-note rule (see the header).
    for (int i = 0; numFresh > 0 && i < numNotes; ++i)
    {
        auto& stored = notes[(size_t) i];
        if (! stored.fresh)
            continue;
        stored.fresh = false;
        --numFresh;
        if (toSample (stored.note.onPpq) >= -0.5)
            continue; // still ahead, or due in this block: played in step 3
        if (toSample (stored.note.offPpq) > 0.5)
        {
            start (stored.note, 0, ppq0, samplesPerBeat, numSamples);
            lateNotesPlayed.fetch_add (1, std::memory_order_relaxed);
        }
        else
        {
            lateNotesSkipped.fetch_add (1, std::memory_order_relaxed);
        }
    }

    // 3. Starts that fall inside this block: onPpq in [ppq0 - half a sample, end - half a sample).
    const double lo = ppq0 - 0.5 / samplesPerBeat;
    const double hi = ppq0 + (numSamples - 0.5) / samplesPerBeat;
    const auto* first = std::lower_bound (notes.begin(), notes.begin() + numNotes, lo,
                                          [] (const Stored& s, double p) { return s.note.onPpq < p; });
    for (auto* it = first; it != notes.begin() + numNotes && it->note.onPpq < hi; ++it)
    {
        const int sample = std::clamp ((int) std::floor (toSample (it->note.onPpq) + 0.5), 0, numSamples - 1);
        start (it->note, sample, ppq0, samplesPerBeat, numSamples);
    }

    // Offs of earlier notes, then starts, then offs of notes that began in this block: by sample.
    std::sort (events.begin(), events.begin() + numEvents, [] (const OutEvent& a, const OutEvent& b) {
        if (a.sample != b.sample) return a.sample < b.sample;
        if (a.phase != b.phase) return a.phase < b.phase;
        return a.seq < b.seq;
    });
    for (int i = 0; i < numEvents; ++i)
    {
        const auto& e = events[(size_t) i];
        out.addEvent (juce::MidiMessage (e.status, e.pitch, e.velocity), e.sample);
    }
}

} // namespace segue
