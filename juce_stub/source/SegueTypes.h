#pragma once

#include <cstdint>

namespace segue
{

/** What the host's play head said at one moment (or the plugin's own clock when there is no host
    transport, e.g. the Standalone). Positions are in quarter notes (PPQ) from the song start. */
struct TransportInfo
{
    double ppq = 0.0;
    double bpm = 120.0;
    int numerator = 4;
    int denominator = 4;
    double barStartPpq = 0.0; // a bar line at or before ppq (the host's last bar start)
    bool playing = false;
    bool fromHost = false; // false: the plugin's own clock (no host play head)

    double beatsPerBar() const noexcept { return numerator * 4.0 / denominator; }
};

/** The audio thread -> bridge thread record of what came in: notes played through the plugin,
    a Continue press (parameter, MIDI trigger or button), a transport jump or stop, and each bar line
    the playing transport crosses (at.ppq: the bar line; in order with the notes around it). */
struct CaptureEvent
{
    enum Kind : std::uint8_t { noteOn, noteOff, programChange, trigger, jump, stop, position, barLine };

    Kind kind = noteOn;
    std::uint8_t channel = 0; // 0-15
    std::uint8_t data1 = 0;   // pitch or program
    std::uint8_t data2 = 0;   // velocity
    TransportInfo at;         // at.ppq: the event's exact song position
};

/** One generated note placed on the song timeline, for the audio thread to play. */
struct ScheduledNote
{
    double onPpq = 0.0;
    double offPpq = 0.0;
    std::uint8_t channel = 0; // 0-15
    std::uint8_t pitch = 60;
    std::uint8_t velocity = 100;
};

/** The bridge thread -> audio thread commands. */
struct PlayerCommand
{
    enum Kind : std::uint8_t { addNote, clearAll };

    Kind kind = addNote;
    ScheduledNote note;
};

} // namespace segue
