#include "PluginEditor.h"

namespace segue
{

namespace
{
const juce::Colour background { 0xff1d2025 };
const juce::Colour panel { 0xff272b32 };
const juce::Colour clipColour { 0xff5aa9e6 };
const juce::Colour generatedColour { 0xffffa552 };
const juce::Colour textColour { 0xffe6e6e6 };
const juce::Colour dimText { 0xff9aa0a8 };
const juce::Colour errorColour { 0xffff6b6b };
const juce::Colour okColour { 0xff63d471 };
} // namespace

// --- piano roll --------------------------------------------------------------------------------------

void PianoRoll::show (const BridgeSnapshot& s)
{
    notes = s.preview;
    clipBeats = s.previewLengthBeats;
    totalBeats = std::max (s.previewTotalBeats, s.previewLengthBeats);
    beatsPerBar = s.beatsPerBar;
    empty = notes.empty();
    repaint();
}

void PianoRoll::paint (juce::Graphics& g)
{
    auto area = getLocalBounds().toFloat();
    g.setColour (panel);
    g.fillRoundedRectangle (area, 4.0f);
    if (empty)
    {
        g.setColour (dimText);
        g.setFont (14.0f);
        g.drawFittedText ("Nothing captured yet.\nPlay a clip through Segue (or drop a .mid here), then press Continue.",
                          getLocalBounds().reduced (12), juce::Justification::centred, 3);
        return;
    }

    int low = 127, high = 0;
    for (const auto& n : notes)
    {
        low = std::min (low, n.pitch);
        high = std::max (high, n.pitch);
    }
    low = std::max (0, low - 2);
    high = std::min (127, high + 2);
    const float rows = (float) (high - low + 1);
    const auto inner = area.reduced (6.0f);
    const float beatWidth = inner.getWidth() / (float) std::max (1.0, totalBeats);
    const float rowHeight = inner.getHeight() / rows;

    // Bar lines; the continuation starts at the thicker one.
    for (double beat = 0.0; beat <= totalBeats + 1.0e-6; beat += std::max (0.25, beatsPerBar))
    {
        const float x = inner.getX() + (float) beat * beatWidth;
        const bool boundary = std::abs (beat - clipBeats) < 1.0e-6 && totalBeats > clipBeats;
        g.setColour (boundary ? generatedColour.withAlpha (0.8f) : juce::Colours::white.withAlpha (0.12f));
        g.drawLine (x, inner.getY(), x, inner.getBottom(), boundary ? 2.0f : 1.0f);
    }
    for (const auto& n : notes)
    {
        const float x = inner.getX() + (float) n.start * beatWidth;
        const float w = std::max (2.0f, (float) n.duration * beatWidth - 1.0f);
        const float y = inner.getBottom() - (float) (n.pitch - low + 1) * rowHeight;
        g.setColour (n.generated ? generatedColour : clipColour);
        g.fillRoundedRectangle (x, y, std::min (w, inner.getRight() - x), std::max (2.0f, rowHeight - 1.0f), 1.5f);
    }
}

// --- a variation tile ---------------------------------------------------------------------------------------

VariationTile::VariationTile (BridgeSnapshot::Tile t) : tile (std::move (t))
{
    setTooltip (tile.path + "\nDrag onto a track (drop it at the clip's start and it lines up).");
    setMouseCursor (juce::MouseCursor::DraggingHandCursor);
}

void VariationTile::paint (juce::Graphics& g)
{
    auto area = getLocalBounds().toFloat().reduced (1.0f);
    g.setColour (generatedColour.withAlpha (isMouseOver() ? 0.35f : 0.22f));
    g.fillRoundedRectangle (area, 5.0f);
    g.setColour (generatedColour);
    g.drawRoundedRectangle (area, 5.0f, 1.2f);
    g.setColour (textColour);
    g.setFont (13.0f);
    g.drawFittedText ("Variation " + juce::String (tile.variation + 1) + "\n" + juce::String (tile.notes) + " notes  (drag)",
                      getLocalBounds().reduced (6, 2), juce::Justification::centred, 2);
}

void VariationTile::mouseDrag (const juce::MouseEvent& e)
{
    if (dragging || e.getDistanceFromDragStart() < 4 || ! juce::File (tile.path).existsAsFile())
        return;
    dragging = true;
    juce::DragAndDropContainer::performExternalDragDropOfFiles ({ tile.path }, false, this,
                                                                [safe = juce::Component::SafePointer<VariationTile> (this)] {
                                                                    if (safe != nullptr) safe->dragging = false;
                                                                });
}

// --- the editor ---------------------------------------------------------------------------------------------

SegueEditor::SegueEditor (SegueProcessor& p) : AudioProcessorEditor (p), processor (p)
{
    setOpaque (true);

    title.setText ("Segue", juce::dontSendNotification);
    title.setFont (juce::Font (24.0f, juce::Font::bold));
    for (auto* label : { &title, &link, &status, &error, &clipLabel, &tilesLabel, &portLabel, &commandLabel, &triggerHelp })
    {
        label->setColour (juce::Label::textColourId, textColour);
        addAndMakeVisible (*label);
    }
    error.setColour (juce::Label::textColourId, errorColour);
    error.setMinimumHorizontalScale (1.0f);
    error.setJustificationType (juce::Justification::topLeft);
    status.setJustificationType (juce::Justification::topLeft);
    clipLabel.setColour (juce::Label::textColourId, dimText);
    triggerHelp.setColour (juce::Label::textColourId, dimText);
    triggerHelp.setFont (12.0f);
    triggerHelp.setText ("MIDI CC 102 (value 64 or more) or note 0 also presses Continue.", juce::dontSendNotification);
    tilesLabel.setText ("Variations: drag one onto a track", juce::dontSendNotification);
    portLabel.setText ("Server port", juce::dontSendNotification);
    commandLabel.setText ("segue path", juce::dontSendNotification);

    addAndMakeVisible (roll);

    addSlider (clipBars, clipBarsLabel, ParamId::clipBars, "Clip bars");
    addSlider (bars, barsLabel, ParamId::bars, "Bars");
    addSlider (variations, variationsLabel, ParamId::variations, "Variations");
    addSlider (temperature, temperatureLabel, ParamId::temperature, "Temperature");
    addCombo (key, keyLabel, ParamId::key, "Key lock");
    addCombo (scale, scaleLabel, ParamId::scale, "Scale");
    addSlider (seed, seedLabel, ParamId::seed, "Seed (0 = new)");

    continueButton.setColour (juce::TextButton::buttonColourId, generatedColour.darker (0.3f));
    continueButton.setTooltip ("Continue the last bars you played (or the dropped .mid), in the model's style.");
    continueButton.onClick = [this] { processor.pressContinue(); };
    stopButton.onClick = [this] { processor.pressStop(); };
    usePlayedButton.onClick = [this] { processor.clearClipFile(); };
    usePlayedButton.setTooltip ("Forget the dropped .mid and continue what is played through the plugin again.");
    for (auto* b : { &continueButton, &stopButton, &usePlayedButton, &startServerButton })
        addAndMakeVisible (*b);

    port.setInputRestrictions (5, "0123456789");
    port.setText (juce::String (processor.getBridge().getServerPort()), false);
    port.onReturnKey = port.onFocusLost = [this] {
        const int value = port.getText().getIntValue();
        if (value > 0 && value < 65536)
            processor.getBridge().setServerPort (value);
    };
    command.setText (processor.getBridge().getServerCommand(), false);
    command.setTextToShowWhenEmpty ("e.g. /home/me/.local/bin/segue (optional)", dimText);
    command.setTooltip ("Where the segue command is. When set, Segue starts `segue serve` itself if no server answers.");
    command.onReturnKey = command.onFocusLost = [this] { processor.getBridge().setServerCommand (command.getText()); };
    startServerButton.onClick = [this] {
        processor.getBridge().setServerCommand (command.getText());
        processor.getBridge().startServerNow();
    };
    addAndMakeVisible (port);
    addAndMakeVisible (command);

    setSize (800, 540);
    refresh();
    startTimerHz (15);
}

SegueEditor::~SegueEditor()
{
    stopTimer();
}

void SegueEditor::addSlider (juce::Slider& slider, juce::Label& label, const char* paramId, const juce::String& text)
{
    slider.setSliderStyle (juce::Slider::LinearHorizontal);
    slider.setTextBoxStyle (juce::Slider::TextBoxRight, false, 56, 22);
    label.setText (text, juce::dontSendNotification);
    label.setColour (juce::Label::textColourId, textColour);
    addAndMakeVisible (slider);
    addAndMakeVisible (label);
    sliderAttachments.push_back (std::make_unique<SliderAttachment> (processor.parameters, paramId, slider));
}

void SegueEditor::addCombo (juce::ComboBox& box, juce::Label& label, const char* paramId, const juce::String& text)
{
    if (auto* choice = dynamic_cast<juce::AudioParameterChoice*> (processor.parameters.getParameter (paramId)))
        box.addItemList (choice->choices, 1);
    label.setText (text, juce::dontSendNotification);
    label.setColour (juce::Label::textColourId, textColour);
    addAndMakeVisible (box);
    addAndMakeVisible (label);
    comboAttachments.push_back (std::make_unique<ComboAttachment> (processor.parameters, paramId, box));
}

void SegueEditor::paint (juce::Graphics& g)
{
    g.fillAll (background);
    // Connection dot.
    const auto s = lastLink;
    g.setColour (s == BridgeSnapshot::Link::connected ? okColour
                 : s == BridgeSnapshot::Link::connecting ? dimText : errorColour);
    g.fillEllipse ((float) link.getX() - 16.0f, (float) link.getY() + 9.0f, 10.0f, 10.0f);
    if (dropHover)
    {
        g.setColour (clipColour);
        g.drawRect (getLocalBounds(), 3);
    }
}

void SegueEditor::resized()
{
    auto area = getLocalBounds().reduced (12);
    auto top = area.removeFromTop (30);
    title.setBounds (top.removeFromLeft (110));
    top.removeFromLeft (20);
    link.setBounds (top);
    error.setBounds (area.removeFromTop (40));
    area.removeFromTop (4);

    auto bottom = area.removeFromBottom (26);
    portLabel.setBounds (bottom.removeFromLeft (78));
    port.setBounds (bottom.removeFromLeft (64));
    bottom.removeFromLeft (12);
    commandLabel.setBounds (bottom.removeFromLeft (78));
    startServerButton.setBounds (bottom.removeFromRight (100));
    bottom.removeFromRight (8);
    command.setBounds (bottom);
    area.removeFromBottom (6);
    triggerHelp.setBounds (area.removeFromBottom (20));

    auto right = area.removeFromRight (280);
    area.removeFromRight (12);
    const auto row = [&right] (juce::Label& label, juce::Component& control) {
        auto r = right.removeFromTop (28);
        label.setBounds (r.removeFromLeft (104));
        control.setBounds (r.reduced (0, 2));
        right.removeFromTop (2);
    };
    row (clipBarsLabel, clipBars);
    row (barsLabel, bars);
    row (variationsLabel, variations);
    row (temperatureLabel, temperature);
    row (keyLabel, key);
    row (scaleLabel, scale);
    row (seedLabel, seed);
    right.removeFromTop (8);
    auto buttons = right.removeFromTop (40);
    stopButton.setBounds (buttons.removeFromRight (70));
    buttons.removeFromRight (8);
    continueButton.setBounds (buttons);

    auto rollArea = area.removeFromTop (230);
    roll.setBounds (rollArea);
    auto clipRow = area.removeFromTop (26);
    usePlayedButton.setBounds (clipRow.removeFromRight (130).reduced (0, 2));
    clipLabel.setBounds (clipRow);
    status.setBounds (area.removeFromTop (40));
    tilesLabel.setBounds (area.removeFromTop (20));
    auto tileRow = area.removeFromTop (46);
    const int count = (int) tiles.size();
    const int tileWidth = count == 0 ? 0 : juce::jmin (112, (tileRow.getWidth() - 6 * (count - 1)) / count);
    for (auto& t : tiles)
    {
        t->setBounds (tileRow.removeFromLeft (tileWidth));
        tileRow.removeFromLeft (6);
    }
}

bool SegueEditor::isInterestedInFileDrag (const juce::StringArray& files)
{
    for (const auto& f : files)
        if (f.endsWithIgnoreCase (".mid") || f.endsWithIgnoreCase (".midi"))
            return true;
    return false;
}

void SegueEditor::filesDropped (const juce::StringArray& files, int, int)
{
    dropHover = false;
    for (const auto& f : files)
    {
        if (f.endsWithIgnoreCase (".mid") || f.endsWithIgnoreCase (".midi"))
        {
            dropError = processor.loadClipFile (juce::File (f));
            break;
        }
    }
    refresh();
    repaint();
}

void SegueEditor::timerCallback()
{
    refresh();
}

void SegueEditor::refresh()
{
    const auto s = processor.snapshot();
    juce::String linkText;
    switch (s.link)
    {
        case BridgeSnapshot::Link::connected:
            linkText = "Connected to segue serve " + s.serverVersion + " on port " + juce::String (s.serverPort)
                       + "  |  model: " + (s.modelName.isEmpty() ? juce::String ("none loaded") : s.modelName);
            break;
        case BridgeSnapshot::Link::connecting:
            linkText = "Looking for segue serve on 127.0.0.1:" + juce::String (s.serverPort) + "...";
            break;
        case BridgeSnapshot::Link::noServer:
            linkText = "No server on 127.0.0.1:" + juce::String (s.serverPort) + ". Start one: " + s.startCommand;
            break;
        case BridgeSnapshot::Link::wrongProtocol:
            linkText = "segue serve " + s.serverVersion + " speaks another protocol version";
            break;
    }
    if (s.serverStartedByUs)
        linkText += "  (started by Segue)";
    link.setText (linkText, juce::dontSendNotification);
    if (s.link != lastLink)
    {
        lastLink = s.link;
        repaint();
    }

    error.setText (dropError.isNotEmpty() ? dropError : s.error, juce::dontSendNotification);
    if (s.error.isNotEmpty())
        dropError.clear();

    juce::String statusText = s.status;
    if (! s.running && s.prepared.isNotEmpty())
        statusText += "  |  " + s.prepared;
    if (s.firstNoteMs >= 0.0)
        statusText += "\nFirst note after " + juce::String (juce::roundToInt (s.firstNoteMs)) + " ms"
                      + (s.serverFirstNoteMs >= 0.0 ? " (server: " + juce::String (juce::roundToInt (s.serverFirstNoteMs)) + " ms)" : juce::String());
    if (s.lateNotesPlayed + s.lateNotesSkipped > 0)
        statusText += "  |  late notes: " + juce::String (s.lateNotesPlayed) + " played at once, "
                      + juce::String (s.lateNotesSkipped) + " skipped";
    status.setText (statusText, juce::dontSendNotification);

    const bool fromFile = s.clipSource.isNotEmpty() && s.clipSource != "played";
    clipLabel.setText (s.clipSource.isEmpty() ? juce::String ("Clip: nothing played yet")
                       : fromFile ? "Clip: " + s.clipSource + " (dropped file)"
                                  : "Clip: the last bars played through Segue"
                                        + juce::String (s.hostTransport ? "" : " (own clock, 120 BPM 4/4: no host transport)"),
                       juce::dontSendNotification);
    usePlayedButton.setVisible (processor.getBridge().hasFileClip());
    continueButton.setEnabled (s.link != BridgeSnapshot::Link::wrongProtocol);
    stopButton.setEnabled (s.running);
    roll.show (s);

    bool same = tiles.size() == s.tiles.size();
    for (size_t i = 0; same && i < tiles.size(); ++i)
        same = tiles[i]->tile.path == s.tiles[i].path && tiles[i]->tile.notes == s.tiles[i].notes;
    if (! same)
    {
        tiles.clear();
        for (const auto& t : s.tiles)
        {
            tiles.push_back (std::make_unique<VariationTile> (t));
            addAndMakeVisible (*tiles.back());
        }
        resized();
    }
}

} // namespace segue
