#include "PluginProcessor.h"
#include "PluginEditor.h"

#include <algorithm>
#include <cmath>

namespace segue
{

namespace
{
const juce::StringArray keyNames { "Off", "C", "C#", "D", "Eb", "E", "F", "F#", "G", "Ab", "A", "Bb", "B" };

juce::StringArray scaleNames()
{
    return juce::StringArray::fromTokens (SEGUE_SCALES, "|", "");
}

bool validDenominator (int d)
{
    return d == 1 || d == 2 || d == 4 || d == 8 || d == 16 || d == 32;
}
} // namespace

SegueProcessor::SegueProcessor()
    : AudioProcessor (BusesProperties()),
      parameters (*this, nullptr, "Segue", createLayout()),
      bridge (captureFifo, playerFifo, [this] { return readSettings(); })
{
    clipBarsParam = parameters.getRawParameterValue (ParamId::clipBars);
    barsParam = parameters.getRawParameterValue (ParamId::bars);
    variationsParam = parameters.getRawParameterValue (ParamId::variations);
    temperatureParam = parameters.getRawParameterValue (ParamId::temperature);
    keyParam = parameters.getRawParameterValue (ParamId::key);
    scaleParam = parameters.getRawParameterValue (ParamId::scale);
    seedParam = parameters.getRawParameterValue (ParamId::seed);
    triggerParam = parameters.getRawParameterValue (ParamId::trigger);

    // Defaults a test or a launcher can set; the host's saved state overrides them.
    const auto port = juce::SystemStats::getEnvironmentVariable ("SEGUE_OSC_PORT", {}).getIntValue();
    if (port > 0 && port < 65536)
        bridge.setServerPort (port);
    bridge.setServerCommand (juce::SystemStats::getEnvironmentVariable ("SEGUE_SERVE_COMMAND", {}));

    // The Standalone opens a .mid named on its command line as the clip: `Segue my-clip.mid`.
    if (juce::JUCEApplicationBase::isStandaloneApp())
        for (const auto& argument : juce::JUCEApplicationBase::getCommandLineParameterArray())
            if (argument.endsWithIgnoreCase (".mid") || argument.endsWithIgnoreCase (".midi"))
                if (const auto file = juce::File::getCurrentWorkingDirectory().getChildFile (argument.unquoted()); file.existsAsFile())
                    loadClipFile (file);

    bridge.start();
    startTimer (100);
}

SegueProcessor::~SegueProcessor()
{
    stopTimer();
    bridge.stop();
}

juce::AudioProcessorValueTreeState::ParameterLayout SegueProcessor::createLayout()
{
    using namespace juce;
    AudioProcessorValueTreeState::ParameterLayout layout;
    layout.add (std::make_unique<AudioParameterInt> (ParameterID { ParamId::clipBars, 1 }, "Clip bars", 1, 16, 4));
    layout.add (std::make_unique<AudioParameterInt> (ParameterID { ParamId::bars, 1 }, "Bars", 1, SEGUE_MAX_BARS, 4));
    layout.add (std::make_unique<AudioParameterInt> (ParameterID { ParamId::variations, 1 }, "Variations", 1,
                                                     SEGUE_MAX_VARIATIONS, 3));
    layout.add (std::make_unique<AudioParameterFloat> (ParameterID { ParamId::temperature, 1 }, "Temperature",
                                                       NormalisableRange<float> (0.0f, 2.0f, 0.01f), 0.9f));
    layout.add (std::make_unique<AudioParameterChoice> (ParameterID { ParamId::key, 1 }, "Key lock", keyNames, 0));
    layout.add (std::make_unique<AudioParameterChoice> (ParameterID { ParamId::scale, 1 }, "Scale", scaleNames(), 0));
    layout.add (std::make_unique<AudioParameterInt> (ParameterID { ParamId::seed, 1 }, "Seed", 0, 9999, 0));
    layout.add (std::make_unique<AudioParameterBool> (ParameterID { ParamId::trigger, 1 }, "Continue", false));
    return layout;
}

RequestSettings SegueProcessor::readSettings() const
{
    RequestSettings s;
    s.clipBars = juce::roundToInt (clipBarsParam->load());
    s.bars = juce::roundToInt (barsParam->load());
    s.variations = juce::roundToInt (variationsParam->load());
    s.temperature = std::round (temperatureParam->load() * 100.0) / 100.0;
    s.key = juce::roundToInt (keyParam->load()) - 1; // choice 0 = off
    s.scale = scaleNames()[juce::roundToInt (scaleParam->load())];
    const int seed = juce::roundToInt (seedParam->load());
    s.seed = seed == 0 ? -1 : seed;
    return s;
}

void SegueProcessor::prepareToPlay (double newSampleRate, int samplesPerBlock)
{
    sampleRate = newSampleRate > 0.0 ? newSampleRate : 44100.0;
    scratch.ensureSize ((size_t) juce::jmax (4096, samplesPerBlock * 16));
    haveLast = false;
    lastTriggerParam = triggerParam->load() >= 0.5f; // a session saved with Continue on does not press it on load
}

TransportInfo SegueProcessor::readTransport()
{
    TransportInfo t;
    if (auto* head = getPlayHead())
    {
        if (const auto position = head->getPosition())
        {
            if (const auto ppq = position->getPpqPosition())
            {
                t.fromHost = true;
                t.ppq = *ppq;
                t.bpm = position->getBpm().orFallback (120.0);
                if (const auto meter = position->getTimeSignature())
                {
                    t.numerator = meter->numerator;
                    t.denominator = meter->denominator;
                }
                t.barStartPpq = position->getPpqPositionOfLastBarStart().orFallback (0.0);
                t.playing = position->getIsPlaying();
            }
        }
    }
    if (! t.fromHost) // no host transport (the Standalone): the plugin's own clock, 120 BPM 4/4, always running
    {
        t.ppq = ownClockPpq;
        t.playing = true;
    }
    if (! (t.bpm >= 1.0 && t.bpm <= 1000.0))
        t.bpm = 120.0;
    if (t.numerator < 1 || t.numerator > 64 || ! validDenominator (t.denominator))
    {
        t.numerator = 4;
        t.denominator = 4;
    }
    if (! std::isfinite (t.barStartPpq) || t.barStartPpq > t.ppq + 1.0e-6)
        t.barStartPpq = 0.0;
    return t;
}

void SegueProcessor::pushCapture (CaptureEvent::Kind kind, const TransportInfo& at, int channel, int data1, int data2) noexcept
{
    CaptureEvent e;
    e.kind = kind;
    e.channel = (std::uint8_t) channel;
    e.data1 = (std::uint8_t) data1;
    e.data2 = (std::uint8_t) data2;
    e.at = at;
    if (! captureFifo.push (e))
        capturesLost.fetch_add (1, std::memory_order_relaxed);
}

void SegueProcessor::processBlock (juce::AudioBuffer<float>& audio, juce::MidiBuffer& midi)
{
    juce::ScopedNoDenormals noDenormals;
    audio.clear();
    const int numSamples = audio.getNumSamples();

    const TransportInfo now = readTransport();
    const double samplesPerBeat = sampleRate * 60.0 / now.bpm;
    const double blockBeats = numSamples / samplesPerBeat;

    const bool jumped = haveLast && now.playing && wasPlaying
                        && std::abs (now.ppq - expectedPpq) > 0.01 + 0.5 * blockBeats;
    if (jumped)
        pushCapture (CaptureEvent::jump, now);
    if (wasPlaying && ! now.playing)
        pushCapture (CaptureEvent::stop, now);

    // Continue: the parameter's rising edge, or the editor's button (placed at this block's start).
    const bool triggerOn = triggerParam->load() >= 0.5f;
    if (triggerOn && ! lastTriggerParam)
        pushCapture (CaptureEvent::trigger, now);
    lastTriggerParam = triggerOn;
    if (uiTrigger.exchange (false))
        pushCapture (CaptureEvent::trigger, now);

    // A bar line inside this block (the playing transport crossed it): the bridge prepares the clip
    // a Continue pressed right there would send. Told in order with the notes, before those on it.
    if (jumped || ! wasPlaying)
        lastBarLinePpq = -1.0e9;
    double barLineSample = -1.0;
    TransportInfo barLine = now;
    if (now.playing)
    {
        const double barStart = barStartAtOrBefore (now, now.ppq);
        barLine.ppq = now.ppq - barStart < 1.0e-9 ? barStart : barStart + now.beatsPerBar();
        barLine.barStartPpq = barLine.ppq;
        if (barLine.ppq < now.ppq + blockBeats - 1.0e-9 && std::abs (barLine.ppq - lastBarLinePpq) > 1.0e-6)
            barLineSample = std::max (0.0, (barLine.ppq - now.ppq) * samplesPerBeat);
    }
    const auto pushBarLineBefore = [&] (double sample) noexcept {
        if (barLineSample >= 0.0 && sample >= barLineSample - 1.0e-6)
        {
            pushCapture (CaptureEvent::barLine, barLine);
            lastBarLinePpq = barLine.ppq;
            barLineSample = -1.0;
        }
    };

    // MIDI in: pass it on, remember notes with their song positions, act on the trigger CC/note.
    scratch.clear();
    for (const auto meta : midi)
    {
        pushBarLineBefore (meta.samplePosition);
        // Raw bytes, not juce::MidiMessage: a long SysEx would allocate.
        const auto* bytes = meta.data;
        const int status = meta.numBytes > 0 ? (bytes[0] & 0xf0) : 0;
        const int channel = meta.numBytes > 0 ? (bytes[0] & 0x0f) : 0;
        const int data1 = meta.numBytes > 1 ? (bytes[1] & 0x7f) : 0;
        const int data2 = meta.numBytes > 2 ? (bytes[2] & 0x7f) : 0;
        const bool noteOn = status == 0x90 && meta.numBytes >= 3 && data2 > 0;
        const bool noteOff = (status == 0x80 || (status == 0x90 && data2 == 0)) && meta.numBytes >= 3;
        TransportInfo at = now;
        at.ppq = now.ppq + meta.samplePosition / samplesPerBeat;

        if (status == 0xb0 && meta.numBytes >= 3 && data1 == triggerController)
        {
            if (data2 >= 64)
                pushCapture (CaptureEvent::trigger, at);
            continue;
        }
        if ((noteOn || noteOff) && data1 == triggerNote)
        {
            if (noteOn)
            {
                triggerNoteHeld[channel] = true;
                pushCapture (CaptureEvent::trigger, at);
                continue;
            }
            if (triggerNoteHeld[channel])
            {
                triggerNoteHeld[channel] = false;
                continue;
            }
        }
        if (now.playing)
        {
            if (noteOn)
                pushCapture (CaptureEvent::noteOn, at, channel, data1, data2);
            else if (noteOff)
                pushCapture (CaptureEvent::noteOff, at, channel, data1);
            else if (status == 0xc0 && meta.numBytes >= 2)
                pushCapture (CaptureEvent::programChange, at, channel, data1);
        }
        scratch.addEvent (meta.data, meta.numBytes, meta.samplePosition);
    }
    pushBarLineBefore ((double) numSamples);

    // Generated notes from the bridge, then this block's share of them.
    PlayerCommand command;
    while (playerFifo.pop (command))
    {
        if (command.kind == PlayerCommand::clearAll)
            player.clear();
        else
            player.add (command.note);
    }
    player.render (scratch, now.ppq, samplesPerBeat, numSamples, now.playing, jumped);
    midi.swapWith (scratch);

    // Where we are, now and then, for the editor's preview and a Continue pressed without audio.
    samplesSincePosition += numSamples;
    if (samplesSincePosition >= (int) (sampleRate / 10.0))
    {
        samplesSincePosition = 0;
        pushCapture (CaptureEvent::position, now);
    }
    lastPpq.store (now.ppq);
    lastBpm.store (now.bpm);
    lastBarStart.store (now.barStartPpq);
    lastNumerator.store (now.numerator);
    lastDenominator.store (now.denominator);
    lastBlockAtMs.store (juce::Time::getMillisecondCounterHiRes());

    wasPlaying = now.playing;
    haveLast = true;
    expectedPpq = now.ppq + blockBeats;
    if (! now.fromHost)
        ownClockPpq += blockBeats;
}

void SegueProcessor::pressContinue()
{
    uiTriggerAtMs.store (juce::Time::getMillisecondCounterHiRes());
    uiTrigger.store (true);
}

void SegueProcessor::timerCallback()
{
    // The button was pressed but no audio block ran to place it (the host is not processing):
    // continue from the last known position; the notes play when the transport gets there.
    const double now = juce::Time::getMillisecondCounterHiRes();
    if (uiTrigger.load() && now - uiTriggerAtMs.load() > 300.0 && uiTrigger.exchange (false))
    {
        TransportInfo at;
        at.ppq = lastPpq.load();
        at.bpm = lastBpm.load();
        at.barStartPpq = lastBarStart.load();
        at.numerator = lastNumerator.load();
        at.denominator = lastDenominator.load();
        bridge.continueWithoutTransport (at);
    }
    bridge.setLateCounters (player.lateNotesPlayed.load(), player.lateNotesSkipped.load());
}

BridgeSnapshot SegueProcessor::snapshot() const
{
    return bridge.snapshot();
}

juce::String SegueProcessor::loadClipFile (const juce::File& file)
{
    juce::String error;
    auto clip = readMidiFileClip (file, error);
    if (! clip.has_value())
        return error;
    bridge.setFileClip (std::move (clip));
    bridge.setFileClipPath (file.getFullPathName());
    return {};
}

void SegueProcessor::getStateInformation (juce::MemoryBlock& destData)
{
    auto state = parameters.copyState();
    state.setProperty ("serverPort", bridge.getServerPort(), nullptr);
    state.setProperty ("serverCommand", bridge.getServerCommand(), nullptr);
    state.setProperty ("clipFile", bridge.getFileClipPath(), nullptr);
    if (auto xml = state.createXml())
        copyXmlToBinary (*xml, destData);
}

void SegueProcessor::setStateInformation (const void* data, int sizeInBytes)
{
    const auto xml = getXmlFromBinary (data, sizeInBytes);
    if (xml == nullptr || ! xml->hasTagName (parameters.state.getType()))
        return;
    auto state = juce::ValueTree::fromXml (*xml);
    if (state.hasProperty ("serverPort"))
        bridge.setServerPort ((int) state.getProperty ("serverPort"));
    if (state.hasProperty ("serverCommand"))
        bridge.setServerCommand (state.getProperty ("serverCommand").toString());
    const auto clipFile = state.getProperty ("clipFile").toString();
    if (clipFile.isNotEmpty() && juce::File (clipFile).existsAsFile())
        loadClipFile (juce::File (clipFile));
    parameters.replaceState (state);
    if (auto* trigger = parameters.getParameter (ParamId::trigger); trigger != nullptr && trigger->getValue() >= 0.5f)
        trigger->setValueNotifyingHost (0.0f); // Continue is a momentary press, never a saved state
}

juce::AudioProcessorEditor* SegueProcessor::createEditor()
{
    return new SegueEditor (*this);
}

} // namespace segue

juce::AudioProcessor* JUCE_CALLTYPE createPluginFilter()
{
    return new segue::SegueProcessor();
}
