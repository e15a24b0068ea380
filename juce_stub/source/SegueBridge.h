#pragma once

#include "ClipCapture.h"
#include "SegueTypes.h"
#include "SpscFifo.h"
#include "segue_protocol.h"

#include <juce_osc/juce_osc.h>

#include <deque>
#include <functional>
#include <map>
#include <mutex>

namespace segue
{

/** What the editor shows; copied out under the bridge's lock. */
struct BridgeSnapshot
{
    enum class Link { connecting, connected, noServer, wrongProtocol };

    struct Tile
    {
        int variation = 0; // from 0
        int notes = 0;
        juce::String path;
    };
    struct PreviewNote
    {
        double start, duration; // beats from the clip start
        int pitch;
        bool generated;
    };

    Link link = Link::connecting;
    int serverPort = SEGUE_DEFAULT_OSC_PORT;
    juce::String serverVersion, modelName;
    juce::StringArray models;
    juce::String status;         // what is happening, for musicians
    juce::String error;          // the last error sentence, or empty
    juce::String startCommand;   // the command that starts a server on the port we use
    bool serverStartedByUs = false;
    double firstNoteMs = -1.0;   // press -> first note back, measured here
    double serverFirstNoteMs = -1.0;
    bool running = false;
    std::vector<Tile> tiles;
    std::vector<PreviewNote> preview;
    double previewLengthBeats = 4.0;  // the clip's length; the continuation follows it
    double previewTotalBeats = 8.0;
    double beatsPerBar = 4.0;
    juce::String clipSource;     // "played", a file name, or empty when nothing was captured
    juce::String prepared;       // the server's prefill of the next clip: "preparing 24 notes...", "clip prepared: ...", or empty
    int lateNotesPlayed = 0, lateNotesSkipped = 0;
    bool hostTransport = false;
};

/** The plugin's network side, on its own thread: it owns the OSC reply socket, talks to
    `segue serve` (docs/protocol.md section 9), turns played notes into clips and replies into
    notes for the audio thread. Never touched by the audio thread except through the two FIFOs. */
class SegueBridge : private juce::Thread,
                    private juce::OSCReceiver::Listener<juce::OSCReceiver::RealtimeCallback>
{
public:
    using CaptureFifo = SpscFifo<CaptureEvent, 8192>;
    using PlayerFifo = SpscFifo<PlayerCommand, 4096>;

    SegueBridge (CaptureFifo& fromAudio, PlayerFifo& toAudio, std::function<RequestSettings()> settings);
    ~SegueBridge() override;

    void start();
    /** Sends `cancel ""` (OSC cannot notice that we are gone) and stops the thread. */
    void stop();

    /** Wakes the thread (the audio thread calls nothing here; the processor calls it from other threads). */
    void wake() { wakeEvent.signal(); }

    void setServerPort (int port);
    int getServerPort() const;
    /** The `segue` executable to start when no server answers ("" = never start one). */
    void setServerCommand (const juce::String& command);
    juce::String getServerCommand() const;
    void startServerNow();

    /** A clip read from a dropped .mid replaces the played one until cleared; the bridge thread
        sends it as a `prepare` right away (once connected), so its Continue starts decoding at once. */
    void setFileClip (std::optional<Clip> clip, const juce::String& error = {});
    bool hasFileClip() const;
    juce::String getFileClipPath() const;
    void setFileClipPath (const juce::String& path);

    /** The Continue button when the audio thread is not running (no position to place it at). */
    void continueWithoutTransport (const TransportInfo& at);
    void cancelCurrent();

    BridgeSnapshot snapshot() const;
    void setLateCounters (int played, int skipped);

private:
    struct Upload
    {
        const char* address = SEGUE_OSC_CONTINUE_CHUNK; // or SEGUE_OSC_PREPARE_CHUNK
        juce::String id;
        std::vector<std::string> pieces;
        std::vector<bool> acked;
        int nextToSend = 0;
        int ackedCount = 0;
        double lastProgressMs = 0.0;
        int stalls = 0;
    };
    struct Request
    {
        juce::String id;
        double clipStartPpq = 0.0;
        int outChannel = 0;
        double sentMs = 0.0;
        bool gotNote = false;
        bool over = true;
        int bars = 4;
        Clip clip;
    };

    void run() override;
    void oscMessageReceived (const juce::OSCMessage& message) override;

    void openSockets();
    void closeSockets();
    bool send (const juce::OSCMessage& message);
    juce::OSCMessage request (const char* address, const juce::String& id) const;
    void sendHello();

    void handleCapture (const CaptureEvent& e);
    /** The clip a Continue pressed at `at` sends (the dropped file's, else the captured one; its
        notes may be empty). */
    Clip clipForTrigger (const TransportInfo& at, const RequestSettings& settings) const;
    void handleTrigger (const TransportInfo& at);
    void sendContinue (Clip clip);
    /** Prepares what a Continue pressed at `at` would send, when it changed (protocol.md 3.9): at each bar
        line the playing transport crosses, and where it stops (a Continue pressed while stopped sends
        the clip that ends there, however far into its bar). */
    void prepareAsIfPressedAt (const TransportInfo& at);
    void prepareFileClipIfPending();
    void sendPrepare (const Clip& clip, const RequestSettings& settings);
    void dropPrepareUpload();
    enum class SendResult { sent, uploading, tooLarge, failed };
    /** One request as JSON: one datagram when it fits, else a chunked upload into `slot`. */
    SendResult sendJson (const char* address, const char* tags, const char* chunkAddress, const char* chunkTags,
                         const juce::String& id, const std::string& json, std::optional<Upload>& slot, double nowMs);
    bool isPrepareId (const juce::String& id) const { return id.startsWith (sessionPrefix + "-p"); }
    void handleReply (const juce::OSCMessage& m);
    void serviceConnection (double nowMs);
    void serviceUpload (double nowMs);
    void sendChunks (Upload& u, bool resend);
    void flushToAudio();
    void updatePreview (double nowMs);
    void setErrorLocked (const juce::String& message);
    juce::String startCommandLocked() const;
    void maybeStartServer (double nowMs);

    CaptureFifo& fromAudio;
    PlayerFifo& toAudio;
    std::function<RequestSettings()> getSettings;

    juce::WaitableEvent wakeEvent;
    std::unique_ptr<juce::DatagramSocket> replySocket;
    juce::OSCReceiver receiver { "Segue OSC replies" };
    juce::OSCSender sender;
    int replyPort = 0;

    // Replies from the receiver thread, handled on ours.
    std::mutex inboxLock;
    std::deque<juce::OSCMessage> inbox;

    // Bridge-thread state.
    ClipCapture capture;
    TransportInfo lastTransport;
    juce::String sessionPrefix;
    int requestCounter = 0;
    Request current;
    std::optional<Upload> upload;        // the continue's chunked upload
    std::optional<Upload> prepareUpload; // the latest prepare's chunked upload
    int prepareCounter = 0;
    juce::String lastPrepareId;          // the latest prepare sent; replies to older ones are ignored
    std::string lastPreparedRequest;     // continueJson of the request the server was last given (prepare or continue)
    bool prepareFilePending = false;     // a dropped file waits to be prepared (until connected and idle)
    bool prepareUnsupported = false;     // this server answered prepare with unknown_type (older than prepare)
    std::deque<PlayerCommand> overflow; // waits here when the audio FIFO is full
    double lastHeardMs = -1.0, lastHelloMs = -1.0e9, firstHelloMs = -1.0, lastPreviewMs = 0.0;
    bool sawNoteSinceTrigger = false;
    std::unique_ptr<juce::ChildProcess> serverProcess;
    juce::String serverInstance;                   // from hello: changes when the server restarts
    std::vector<std::pair<int, int>> modelMeters;  // the default model's time signatures, from hello
    bool triedStart = false;
    int connectedPort = 0;

    // Shared with the message thread (editor, processor): under `lock`.
    mutable std::mutex lock;
    BridgeSnapshot state;
    int serverPort = SEGUE_DEFAULT_OSC_PORT;
    juce::String serverCommand;
    std::optional<Clip> fileClip;
    bool fileClipChanged = false;   // setFileClip set a clip: the bridge thread prepares it
    juce::String fileClipPath;
    bool cancelRequested = false;
    std::optional<TransportInfo> pendingUiTrigger;
    bool startServerRequested = false;
    std::vector<BridgeSnapshot::PreviewNote> generatedPreview;
};

} // namespace segue
