#pragma once

#include "NotePlayer.h"
#include "SegueBridge.h"

#include <juce_audio_processors/juce_audio_processors.h>

#include <atomic>

namespace segue
{

/** Parameter ids (stable: hosts save automation under them). */
namespace ParamId
{
inline constexpr const char* clipBars = "clipBars";
inline constexpr const char* bars = "bars";
inline constexpr const char* variations = "variations";
inline constexpr const char* temperature = "temperature";
inline constexpr const char* key = "key";
inline constexpr const char* scale = "scale";
inline constexpr const char* seed = "seed";
inline constexpr const char* trigger = "continue";
} // namespace ParamId

/** MIDI that presses Continue (and is not passed on): CC 102 with a value of 64 or more, or note 0
    (the lowest C), on any channel. */
inline constexpr int triggerController = 102;
inline constexpr int triggerNote = 0;

/** Segue as a MIDI effect: passes the host's MIDI through, remembers what was played with its
    song positions, and on Continue asks `segue serve` (through the bridge thread) to continue the
    last bars; plays the continuation in sync with the host right after the clip.

    processBlock only moves events through lock-free FIFOs and fixed arrays: no locks, no
    allocation (the output MidiBuffer is sized in prepareToPlay), no sockets, no files. */
class SegueProcessor final : public juce::AudioProcessor, private juce::Timer
{
public:
    SegueProcessor();
    ~SegueProcessor() override;

    void prepareToPlay (double sampleRate, int samplesPerBlock) override;
    void releaseResources() override {}
    bool isBusesLayoutSupported (const BusesLayout&) const override { return true; }
    void processBlock (juce::AudioBuffer<float>&, juce::MidiBuffer&) override;
    using AudioProcessor::processBlock;

    juce::AudioProcessorEditor* createEditor() override;
    bool hasEditor() const override { return true; }

    const juce::String getName() const override { return "Segue"; }
    bool acceptsMidi() const override { return true; }
    bool producesMidi() const override { return true; }
    bool isMidiEffect() const override { return true; }
    double getTailLengthSeconds() const override { return 0.0; }

    int getNumPrograms() override { return 1; }
    int getCurrentProgram() override { return 0; }
    void setCurrentProgram (int) override {}
    const juce::String getProgramName (int) override { return {}; }
    void changeProgramName (int, const juce::String&) override {}

    void getStateInformation (juce::MemoryBlock&) override;
    void setStateInformation (const void*, int) override;

    /** The editor's Continue button (message thread). */
    void pressContinue();
    void pressStop() { bridge.cancelCurrent(); }
    /** A dropped .mid: it becomes the clip. Returns the sentence to show when it cannot. */
    juce::String loadClipFile (const juce::File& file);
    void clearClipFile() { bridge.setFileClip (std::nullopt); }

    BridgeSnapshot snapshot() const;
    SegueBridge& getBridge() { return bridge; }
    juce::AudioProcessorValueTreeState parameters;

private:
    static juce::AudioProcessorValueTreeState::ParameterLayout createLayout();
    RequestSettings readSettings() const;
    TransportInfo readTransport();
    void pushCapture (CaptureEvent::Kind kind, const TransportInfo& at, int channel = 0, int data1 = 0, int data2 = 0) noexcept;
    void timerCallback() override;

    SegueBridge::CaptureFifo captureFifo;
    SegueBridge::PlayerFifo playerFifo;
    NotePlayer player;
    SegueBridge bridge;

    std::atomic<float>* clipBarsParam = nullptr;
    std::atomic<float>* barsParam = nullptr;
    std::atomic<float>* variationsParam = nullptr;
    std::atomic<float>* temperatureParam = nullptr;
    std::atomic<float>* keyParam = nullptr;
    std::atomic<float>* scaleParam = nullptr;
    std::atomic<float>* seedParam = nullptr;
    std::atomic<float>* triggerParam = nullptr;

    // Audio-thread state.
    double sampleRate = 44100.0;
    juce::MidiBuffer scratch;
    bool lastTriggerParam = false;
    bool wasPlaying = false;
    bool haveLast = false;
    double expectedPpq = 0.0;
    double ownClockPpq = 0.0;        // the plugin's clock when the host has no play head (Standalone)
    int samplesSincePosition = 0;
    double lastBarLinePpq = -1.0e9;  // the last bar line told to the bridge (it prepares the clip there)
    bool triggerNoteHeld[16] {};

    // Shared between the audio and message threads.
    std::atomic<bool> uiTrigger { false };
    std::atomic<double> uiTriggerAtMs { 0.0 };
    std::atomic<double> lastBlockAtMs { 0.0 };
    std::atomic<double> lastPpq { 0.0 }, lastBpm { 120.0 }, lastBarStart { 0.0 };
    std::atomic<int> lastNumerator { 4 }, lastDenominator { 4 };
    std::atomic<int> capturesLost { 0 };

    JUCE_DECLARE_NON_COPYABLE_WITH_LEAK_DETECTOR (SegueProcessor)
};

} // namespace segue
