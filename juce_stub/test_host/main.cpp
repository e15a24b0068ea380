// segue_test_host: the smallest host that proves the plugin works end to end.
//
//     segue_test_host --script play.json --out events.json
//
// Loads the VST3 named in the script, gives it a play head that runs at a fixed tempo and meter,
// feeds it the script's MIDI events at their exact sample positions, sets parameters at given
// beats, optionally paces the blocks in real time (so a server has time to answer), and writes
// every MIDI event the plugin put out, with its sample and beat, as JSON. The script:
//
//     {"plugin": ".../Segue.vst3", "sample_rate": 48000, "block_size": 256, "bpm": 240,
//      "time_signature": [4, 4], "beats": 24, "realtime_from_beat": 4,
//      "events": [{"beat": 0.0, "midi": [144, 60, 100]}, ...],
//      "params": [{"beat": 7.0, "name": "Continue", "value": 1.0}, {"beat": 0, "name": "Bars", "text": "2"}],
//      "stop_at_beat": 6.5}
//
// Beats count the host's time (blocks processed). With `stop_at_beat` the transport stops there: from
// then on the play head says it is not playing and stays at that position, as a DAW's does, while
// blocks, MIDI events and parameters go on by the host's time.

#include <juce_audio_processors/juce_audio_processors.h>

#include <cmath>
#include <iostream>

namespace
{

class SteadyPlayHead final : public juce::AudioPlayHead
{
public:
    double sampleRate = 48000.0, bpm = 120.0;
    int numerator = 4, denominator = 4;
    juce::int64 sample = 0;
    juce::int64 stopSample = -1; // the transport stops here (host time); -1: it plays throughout

    double samplesPerBeat() const { return sampleRate * 60.0 / bpm; }
    bool playing() const { return stopSample < 0 || sample < stopSample; }

    juce::Optional<PositionInfo> getPosition() const override
    {
        PositionInfo p;
        const juce::int64 position = playing() ? sample : stopSample;
        const double ppq = (double) position / samplesPerBeat();
        const double barLength = numerator * 4.0 / denominator;
        const double bar = std::floor (ppq / barLength + 1.0e-9);
        p.setTimeInSamples (position);
        p.setTimeInSeconds ((double) position / sampleRate);
        p.setBpm (bpm);
        p.setTimeSignature (TimeSignature { numerator, denominator });
        p.setPpqPosition (ppq);
        p.setPpqPositionOfLastBarStart (bar * barLength);
        p.setBarCount ((juce::int64) bar);
        p.setIsPlaying (playing());
        return p;
    }
};

struct ScriptEvent
{
    juce::int64 sample;
    juce::MidiMessage message;
};

struct ScriptParam
{
    juce::int64 sample;
    juce::String name;
    juce::var value, text;
};

int fail (const juce::String& message, int code)
{
    std::cerr << "segue_test_host: " << message << std::endl;
    return code;
}

juce::AudioProcessorParameter* findParameter (juce::AudioPluginInstance& plugin, const juce::String& name)
{
    for (auto* p : plugin.getParameters())
        if (p->getName (100) == name)
            return p;
    return nullptr;
}

} // namespace

int main (int argc, char* argv[])
{
    juce::ScopedJuceInitialiser_GUI juce;
    juce::String scriptPath, outPath;
    for (int i = 1; i + 1 < argc; i += 2)
    {
        const juce::String option (argv[i]);
        if (option == "--script") scriptPath = argv[i + 1];
        else if (option == "--out") outPath = argv[i + 1];
        else return fail ("unknown option " + option, 64);
    }
    if (scriptPath.isEmpty())
        return fail ("usage: segue_test_host --script play.json [--out events.json]", 64);

    const auto scriptFile = juce::File::getCurrentWorkingDirectory().getChildFile (scriptPath);
    if (! scriptFile.existsAsFile())
        return fail ("no script at " + scriptFile.getFullPathName(), 66);
    const auto script = juce::JSON::parse (scriptFile);
    if (! script.isObject())
        return fail ("the script is not a JSON object", 65);

    SteadyPlayHead head;
    head.sampleRate = script.getProperty ("sample_rate", 48000.0);
    head.bpm = script.getProperty ("bpm", 120.0);
    if (const auto* meter = script.getProperty ("time_signature", juce::var()).getArray(); meter != nullptr && meter->size() == 2)
    {
        head.numerator = (*meter)[0];
        head.denominator = (*meter)[1];
    }
    const int blockSize = script.getProperty ("block_size", 256);
    const double totalBeats = script.getProperty ("beats", 16.0);
    const double realtimeFrom = script.getProperty ("realtime_from_beat", 1.0e9);
    const double spb = head.samplesPerBeat();
    const auto toSample = [spb] (double beat) { return (juce::int64) std::llround (beat * spb); };
    if (script.hasProperty ("stop_at_beat"))
        head.stopSample = toSample (script.getProperty ("stop_at_beat", 0.0));

    std::vector<ScriptEvent> events;
    if (const auto* list = script.getProperty ("events", juce::var()).getArray())
    {
        for (const auto& e : *list)
        {
            juce::MemoryBlock bytes;
            if (const auto* midi = e.getProperty ("midi", juce::var()).getArray())
                for (const auto& b : *midi)
                {
                    const auto byte = (juce::uint8) (int) b;
                    bytes.append (&byte, 1);
                }
            events.push_back ({ toSample (e.getProperty ("beat", 0.0)),
                                juce::MidiMessage (bytes.getData(), (int) bytes.getSize()) });
        }
    }
    std::stable_sort (events.begin(), events.end(), [] (const auto& a, const auto& b) { return a.sample < b.sample; });

    std::vector<ScriptParam> params;
    if (const auto* list = script.getProperty ("params", juce::var()).getArray())
        for (const auto& p : *list)
            params.push_back ({ toSample (p.getProperty ("beat", 0.0)), p.getProperty ("name", "").toString(),
                                p.getProperty ("value", juce::var()), p.getProperty ("text", juce::var()) });
    std::stable_sort (params.begin(), params.end(), [] (const auto& a, const auto& b) { return a.sample < b.sample; });

    // Load the plugin.
    juce::VST3PluginFormat format;
    juce::OwnedArray<juce::PluginDescription> types;
    const auto pluginPath = script.getProperty ("plugin", "").toString();
    format.findAllTypesForFile (types, pluginPath);
    if (types.isEmpty())
        return fail ("no VST3 plugin found in " + pluginPath, 2);
    juce::String error;
    auto plugin = format.createInstanceFromDescription (*types[0], head.sampleRate, blockSize, error);
    if (plugin == nullptr)
        return fail ("could not load " + pluginPath + ": " + error, 3);

    plugin->setPlayHead (&head);
    plugin->enableAllBuses();
    plugin->prepareToPlay (head.sampleRate, blockSize);
    const int channels = juce::jmax (1, plugin->getTotalNumInputChannels(), plugin->getTotalNumOutputChannels());
    juce::AudioBuffer<float> audio (channels, blockSize);
    juce::MidiBuffer midi;

    auto parametersJson = juce::Array<juce::var>();
    for (auto* p : plugin->getParameters())
    {
        auto* o = new juce::DynamicObject();
        o->setProperty ("name", p->getName (100));
        o->setProperty ("value", p->getValue());
        o->setProperty ("text", p->getCurrentValueAsText());
        parametersJson.add (juce::var (o));
    }

    // Let the plugin's network thread say hello before the first block.
    juce::Thread::sleep ((int) script.getProperty ("settle_ms", 300));

    juce::Array<juce::var> output;
    size_t nextEvent = 0, nextParam = 0;
    const juce::int64 endSample = toSample (totalBeats);
    const double startMs = juce::Time::getMillisecondCounterHiRes();
    double realtimeStartMs = -1.0;
    juce::int64 realtimeStartSample = 0;
    int lateBlocks = 0;

    for (head.sample = 0; head.sample < endSample; head.sample += blockSize)
    {
        const juce::int64 blockEnd = head.sample + blockSize;

        // Parameters due before this block ends are set before it (hosts deliver them per block).
        for (; nextParam < params.size() && params[nextParam].sample < blockEnd; ++nextParam)
        {
            const auto& p = params[nextParam];
            auto* parameter = findParameter (*plugin, p.name);
            if (parameter == nullptr)
                return fail ("the plugin has no parameter named " + p.name, 4);
            const float value = p.text.isVoid() ? (float) (double) p.value : parameter->getValueForText (p.text.toString());
            parameter->beginChangeGesture();
            parameter->setValueNotifyingHost (value);
            parameter->endChangeGesture();
        }

        midi.clear();
        for (; nextEvent < events.size() && events[nextEvent].sample < blockEnd; ++nextEvent)
            midi.addEvent (events[nextEvent].message, (int) (events[nextEvent].sample - head.sample));

        audio.clear();
        plugin->processBlock (audio, midi);

        for (const auto meta : midi)
        {
            auto* o = new juce::DynamicObject();
            const auto sample = head.sample + meta.samplePosition;
            juce::Array<juce::var> bytes;
            for (int i = 0; i < meta.numBytes; ++i)
                bytes.add ((int) meta.data[i]);
            o->setProperty ("sample", sample);
            o->setProperty ("beat", (double) sample / spb);
            o->setProperty ("midi", bytes);
            output.add (juce::var (o));
        }

        // From `realtime_from_beat` on, one block takes as long as it would in a DAW.
        if ((double) head.sample / spb >= realtimeFrom)
        {
            if (realtimeStartMs < 0.0)
            {
                realtimeStartMs = juce::Time::getMillisecondCounterHiRes();
                realtimeStartSample = head.sample;
            }
            const double due = realtimeStartMs + (double) (blockEnd - realtimeStartSample) * 1000.0 / head.sampleRate;
            const double nowMs = juce::Time::getMillisecondCounterHiRes();
            if (nowMs > due + 5.0)
                ++lateBlocks;
            else if (due > nowMs)
                juce::Thread::sleep ((int) (due - nowMs));
        }
    }

    plugin->releaseResources();
    plugin.reset(); // the plugin sends `cancel ""` to the server as it closes

    auto* result = new juce::DynamicObject();
    result->setProperty ("plugin", types[0]->name);
    result->setProperty ("parameters", parametersJson);
    result->setProperty ("events", output);
    result->setProperty ("samples_per_beat", spb);
    result->setProperty ("late_blocks", lateBlocks);
    result->setProperty ("wall_s", (juce::Time::getMillisecondCounterHiRes() - startMs) / 1000.0);
    const auto json = juce::JSON::toString (juce::var (result), true);

    if (outPath.isNotEmpty())
    {
        if (! juce::File::getCurrentWorkingDirectory().getChildFile (outPath).replaceWithText (json))
            return fail ("could not write " + outPath, 5);
    }
    else
    {
        std::cout << json << std::endl;
    }
    return 0;
}
