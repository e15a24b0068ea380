#pragma once

#include "SegueTypes.h"

#include <juce_audio_basics/juce_audio_basics.h>

#include <array>
#include <atomic>

namespace segue
{

/** Plays generated notes against the host play head, on the audio thread. Fixed storage, no
    locks, no allocation.

    Notes stay on the song timeline (sorted by start) until the next request clears them, so a
    transport that loops back plays them again. Each note-on lands on the sample where its PPQ
    position falls inside the block (rounded to the nearest sample); its note-off `duration`
    beats later, in whichever block that is.

    The late-note rule: a note that arrives after its start has passed is played at once (at the
    first sample of the next block) if its written end is still ahead, and ends at that written
    end; a note whose end has passed too is not played on this pass (it stays on the timeline and
    plays if the transport comes round again). */
class NotePlayer
{
public:
    static constexpr int maxNotes = 8192;
    static constexpr int maxSounding = 256;
    static constexpr int maxEventsPerBlock = 1024;

    void add (const ScheduledNote& note) noexcept;
    void clear() noexcept; // forget every stored note; sounding notes are ended by the next render

    /** Writes this block's note-ons and note-offs into `out`.
        ppq0: the song position of the block's first sample; samplesPerBeat from the play head's bpm.
        jumped: the transport moved somewhere other than where the last block ended. */
    void render (juce::MidiBuffer& out, double ppq0, double samplesPerBeat, int numSamples,
                 bool playing, bool jumped) noexcept;

    /** Note-offs for everything sounding, at `sample`. */
    void allNotesOff (juce::MidiBuffer& out, int sample) noexcept;

    int storedNotes() const noexcept { return numNotes; }
    std::atomic<int> lateNotesPlayed { 0 };
    std::atomic<int> lateNotesSkipped { 0 };
    std::atomic<int> notesDroppedFull { 0 };

private:
    struct Stored
    {
        ScheduledNote note;
        bool fresh = true; // not yet looked at by render: the late-note rule applies once
    };
    struct Sounding
    {
        double offPpq;
        std::uint8_t channel, pitch;
    };
    struct OutEvent
    {
        int sample;
        int phase; // 0: ends of earlier notes, 1: starts, 2: ends of notes started in this block
        int seq;
        std::uint8_t status, pitch, velocity;
    };

    void push (int sample, int phase, std::uint8_t status, std::uint8_t pitch, std::uint8_t velocity) noexcept;
    void start (const ScheduledNote& n, int sample, double ppq0, double samplesPerBeat, int numSamples) noexcept;

    std::array<Stored, maxNotes> notes {};
    int numNotes = 0;
    int numFresh = 0;
    bool clearPending = false;
    std::array<Sounding, maxSounding> sounding {};
    int numSounding = 0;
    std::array<OutEvent, maxEventsPerBlock> events {};
    int numEvents = 0;
};

} // namespace segue
