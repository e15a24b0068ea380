#pragma once

#include "PluginProcessor.h"

#include <juce_gui_basics/juce_gui_basics.h>

namespace segue
{

/** The captured clip (blue) and the continuation streaming in after it (orange), bar lines marked. */
class PianoRoll final : public juce::Component
{
public:
    void show (const BridgeSnapshot& s);
    void paint (juce::Graphics&) override;

private:
    std::vector<BridgeSnapshot::PreviewNote> notes;
    double clipBeats = 4.0, totalBeats = 8.0, beatsPerBar = 4.0;
    bool empty = true;
};

/** One finished variation: drag it onto a track to import its .mid. */
class VariationTile final : public juce::Component, public juce::SettableTooltipClient
{
public:
    explicit VariationTile (BridgeSnapshot::Tile tile);
    void paint (juce::Graphics&) override;
    void mouseDrag (const juce::MouseEvent&) override;
    void mouseUp (const juce::MouseEvent&) override { dragging = false; }

    const BridgeSnapshot::Tile tile;

private:
    bool dragging = false;
};

class SegueEditor final : public juce::AudioProcessorEditor,
                          public juce::FileDragAndDropTarget,
                          private juce::Timer
{
public:
    explicit SegueEditor (SegueProcessor&);
    ~SegueEditor() override;

    void paint (juce::Graphics&) override;
    void resized() override;

    bool isInterestedInFileDrag (const juce::StringArray& files) override;
    void filesDropped (const juce::StringArray& files, int, int) override;
    void fileDragEnter (const juce::StringArray&, int, int) override { dropHover = true; repaint(); }
    void fileDragExit (const juce::StringArray&) override { dropHover = false; repaint(); }

private:
    using SliderAttachment = juce::AudioProcessorValueTreeState::SliderAttachment;
    using ComboAttachment = juce::AudioProcessorValueTreeState::ComboBoxAttachment;

    void timerCallback() override;
    void refresh();
    void addSlider (juce::Slider&, juce::Label&, const char* paramId, const juce::String& text);
    void addCombo (juce::ComboBox&, juce::Label&, const char* paramId, const juce::String& text);

    SegueProcessor& processor;
    juce::TooltipWindow tooltips { this, 400 };

    juce::Label title, link, status, error, clipLabel, tilesLabel, portLabel, commandLabel, triggerHelp;
    PianoRoll roll;
    juce::TextButton continueButton { "Continue" }, stopButton { "Stop" }, usePlayedButton { "Use played notes" },
        startServerButton { "Start server" };
    juce::Slider clipBars, bars, variations, temperature, seed;
    juce::Label clipBarsLabel, barsLabel, variationsLabel, temperatureLabel, seedLabel, keyLabel, scaleLabel;
    juce::ComboBox key, scale;
    juce::TextEditor port, command;
    std::vector<std::unique_ptr<SliderAttachment>> sliderAttachments;
    std::vector<std::unique_ptr<ComboAttachment>> comboAttachments;
    std::vector<std::unique_ptr<VariationTile>> tiles;
    juce::String dropError;
    bool dropHover = false;
    BridgeSnapshot::Link lastLink = BridgeSnapshot::Link::connecting;

    JUCE_DECLARE_NON_COPYABLE_WITH_LEAK_DETECTOR (SegueEditor)
};

} // namespace segue
