#include "SegueBridge.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#if ! JUCE_WINDOWS
 #include <fcntl.h>
 #include <sys/socket.h>
#endif

namespace segue
{

namespace
{
constexpr double helloTimeoutMs = 1500.0;     // no hello reply within this: tell the musician to start a server
constexpr double keepAliveMs = 2000.0;        // hello when nothing was heard for this long
constexpr double quietStreamMs = 1500.0;      // ... or this long while a request runs
constexpr double lostAfterMs = SEGUE_CLIENT_SILENCE_S * 1000.0 * 0.6; // then the server counts as gone
constexpr double previewEveryMs = 100.0;
constexpr int keepBars = 17;                  // captured history kept: the largest clip plus the bar in progress

double nowMs() { return juce::Time::getMillisecondCounterHiRes(); }

/** Bytes an OSC string takes: the text, a NUL, padded to 4. */
size_t oscStringSize (size_t length) { return (length + 4) & ~(size_t) 3; }

int argInt (const juce::OSCMessage& m, int index)
{
    if (index >= m.size()) return 0;
    const auto& a = m[index];
    if (a.isInt32()) return a.getInt32();
    if (a.isFloat32()) return (int) std::lround (a.getFloat32());
    return 0;
}

double argFloat (const juce::OSCMessage& m, int index)
{
    if (index >= m.size()) return 0.0;
    const auto& a = m[index];
    if (a.isFloat32()) return a.getFloat32();
    if (a.isInt32()) return a.getInt32();
    return 0.0;
}

juce::String argString (const juce::OSCMessage& m, int index)
{
    if (index >= m.size() || ! m[index].isString()) return {};
    return m[index].getString();
}

/** The reply at `address` with at least the arguments we read (a newer server may append more;
    an older one sends hello without `instance`). */
bool isReply (const juce::OSCMessage& m, const char* address, int argumentsNeeded)
{
    return m.getAddressPattern().toString() == address && m.size() >= argumentsNeeded;
}

int argCount (const char* tags) { return (int) std::strlen (tags); }

juce::String shellQuote (const juce::String& text)
{
    return "'" + text.replace ("'", "'\\''") + "'";
}
} // namespace

SegueBridge::SegueBridge (CaptureFifo& fromAudioIn, PlayerFifo& toAudioIn, std::function<RequestSettings()> settings)
    : juce::Thread ("Segue bridge"), fromAudio (fromAudioIn), toAudio (toAudioIn), getSettings (std::move (settings))
{
    sessionPrefix = juce::String::toHexString (juce::Random::getSystemRandom().nextInt()).paddedLeft ('0', 8).substring (0, 6);
    state.status = "Looking for segue serve...";
}

SegueBridge::~SegueBridge()
{
    stop();
}

void SegueBridge::start()
{
    startThread();
}

void SegueBridge::stop()
{
    if (isThreadRunning())
    {
        signalThreadShouldExit();
        wake();
        stopThread (4000);
    }
}

// --- settings from the message thread --------------------------------------------------------------

void SegueBridge::setServerPort (int port)
{
    {
        std::lock_guard<std::mutex> guard (lock);
        serverPort = juce::jlimit (1, 65535, port);
    }
    wake();
}

int SegueBridge::getServerPort() const
{
    std::lock_guard<std::mutex> guard (lock);
    return serverPort;
}

void SegueBridge::setServerCommand (const juce::String& command)
{
    std::lock_guard<std::mutex> guard (lock);
    serverCommand = command.trim();
}

juce::String SegueBridge::getServerCommand() const
{
    std::lock_guard<std::mutex> guard (lock);
    return serverCommand;
}

void SegueBridge::startServerNow()
{
    {
        std::lock_guard<std::mutex> guard (lock);
        startServerRequested = true;
    }
    wake();
}

void SegueBridge::setFileClip (std::optional<Clip> clip, const juce::String& error)
{
    {
        std::lock_guard<std::mutex> guard (lock);
        fileClip = std::move (clip);
        fileClipChanged = fileClip.has_value();
        if (! fileClip.has_value())
            fileClipPath.clear();
        state.error = error;
        if (fileClip.has_value())
            state.status = "Clip from " + fileClip->source + ": " + juce::String ((int) fileClip->notes.size())
                           + " notes. Press Continue.";
    }
    wake(); // the bridge thread prepares it
}

bool SegueBridge::hasFileClip() const
{
    std::lock_guard<std::mutex> guard (lock);
    return fileClip.has_value();
}

juce::String SegueBridge::getFileClipPath() const
{
    std::lock_guard<std::mutex> guard (lock);
    return fileClipPath;
}

void SegueBridge::setFileClipPath (const juce::String& path)
{
    std::lock_guard<std::mutex> guard (lock);
    fileClipPath = path;
}

void SegueBridge::continueWithoutTransport (const TransportInfo& at)
{
    {
        std::lock_guard<std::mutex> guard (lock);
        pendingUiTrigger = at;
    }
    wake();
}

void SegueBridge::cancelCurrent()
{
    {
        std::lock_guard<std::mutex> guard (lock);
        cancelRequested = true;
    }
    wake();
}

BridgeSnapshot SegueBridge::snapshot() const
{
    std::lock_guard<std::mutex> guard (lock);
    auto copy = state;
    copy.serverPort = serverPort;
    copy.startCommand = startCommandLocked();
    return copy;
}

void SegueBridge::setLateCounters (int played, int skipped)
{
    std::lock_guard<std::mutex> guard (lock);
    state.lateNotesPlayed = played;
    state.lateNotesSkipped = skipped;
}

juce::String SegueBridge::startCommandLocked() const
{
    return serverPort == SEGUE_DEFAULT_OSC_PORT ? juce::String ("segue serve")
                                                : "segue serve --osc-port " + juce::String (serverPort);
}

void SegueBridge::setErrorLocked (const juce::String& message)
{
    state.error = message;
    state.running = false;
}

// --- the thread ----------------------------------------------------------------------------------

void SegueBridge::run()
{
    openSockets();

    while (! threadShouldExit())
    {
        wakeEvent.wait (10);
        const double now = nowMs();

        std::optional<TransportInfo> uiTrigger;
        bool cancel = false, startServer = false, newFileClip = false;
        int port = 0;
        {
            std::lock_guard<std::mutex> guard (lock);
            std::swap (uiTrigger, pendingUiTrigger);
            std::swap (cancel, cancelRequested);
            std::swap (startServer, startServerRequested);
            std::swap (newFileClip, fileClipChanged);
            port = serverPort;
        }
        if (newFileClip)
            prepareFilePending = true;

        if (port != connectedPort && replySocket != nullptr)
        {
            // Requests leave from the reply socket too (the server answers the port named in them).
            sender.disconnect();
            sender.connectToSocket (*replySocket, SEGUE_DEFAULT_HOST, port);
            connectedPort = port;
            lastHeardMs = -1.0;
            firstHelloMs = now;
            triedStart = false;
            // Another server: it has prepared nothing of ours.
            prepareUpload.reset();
            lastPreparedRequest.clear();
            prepareUnsupported = false;
            {
                std::lock_guard<std::mutex> guard (lock);
                state.link = BridgeSnapshot::Link::connecting;
                state.status = "Looking for segue serve on port " + juce::String (port) + "...";
            }
            sendHello();
        }

        CaptureEvent event;
        while (fromAudio.pop (event))
            handleCapture (event);
        if (uiTrigger.has_value())
            handleTrigger (*uiTrigger);

        if (cancel && ! current.over)
        {
            send (request (SEGUE_OSC_CANCEL, current.id));
            current.over = true;
            upload.reset();
            overflow.push_back (PlayerCommand { PlayerCommand::clearAll, {} });
            std::lock_guard<std::mutex> guard (lock);
            state.running = false;
            state.status = "Stopped.";
        }

        std::deque<juce::OSCMessage> batch;
        {
            std::lock_guard<std::mutex> guard (inboxLock);
            std::swap (batch, inbox);
        }
        for (const auto& m : batch)
            handleReply (m);
        prepareFileClipIfPending();

        flushToAudio();
        if (startServer)
        {
            triedStart = false;
            maybeStartServer (now);
        }
        serviceConnection (now);
        serviceUpload (now);
        updatePreview (now);
    }

    // OSC has no disconnect: without this the server generates to the end for nobody.
    if (connectedPort > 0)
        send (request (SEGUE_OSC_CANCEL, ""));
    closeSockets();
    if (serverProcess != nullptr && serverProcess->isRunning())
        serverProcess->kill();
}

void SegueBridge::openSockets()
{
    replySocket = std::make_unique<juce::DatagramSocket> (false);
    // Port 0: the OS picks a free one. It is this plugin instance's identity on the server.
    if (! replySocket->bindToPort (0, SEGUE_DEFAULT_HOST))
    {
        std::lock_guard<std::mutex> guard (lock);
        state.error = "Could not open a UDP socket on 127.0.0.1 for the server's replies.";
        return;
    }
   #if ! JUCE_WINDOWS
    int bytes = 1 << 20; // a burst of notes must not overflow the socket while the receiver thread sleeps
    setsockopt (replySocket->getRawSocketHandle(), SOL_SOCKET, SO_RCVBUF, &bytes, sizeof (bytes));
    // A `segue serve` started from here must not inherit (and so keep alive) this instance's port.
    fcntl (replySocket->getRawSocketHandle(), F_SETFD, FD_CLOEXEC);
   #endif
    replyPort = replySocket->getBoundPort();
    receiver.addListener (this);
    receiver.connectToSocket (*replySocket);
}

void SegueBridge::closeSockets()
{
    receiver.removeListener (this);
    receiver.disconnect();
    sender.disconnect();
    if (replySocket != nullptr)
        replySocket->shutdown();
    replySocket.reset();
}

void SegueBridge::oscMessageReceived (const juce::OSCMessage& message)
{
    {
        std::lock_guard<std::mutex> guard (inboxLock);
        inbox.push_back (message);
    }
    wakeEvent.signal();
}

bool SegueBridge::send (const juce::OSCMessage& message)
{
    return connectedPort > 0 && sender.send (message);
}

juce::OSCMessage SegueBridge::request (const char* address, const juce::String& id) const
{
    juce::OSCMessage m { juce::OSCAddressPattern (address) };
    m.addInt32 ((juce::int32) replyPort);
    m.addString (id);
    return m;
}

void SegueBridge::sendHello()
{
    lastHelloMs = nowMs();
    send (request (SEGUE_OSC_HELLO, sessionPrefix + "-hello"));
}

// --- what the audio thread saw ------------------------------------------------------------------------

void SegueBridge::handleCapture (const CaptureEvent& e)
{
    lastTransport = e.at;
    switch (e.kind)
    {
        case CaptureEvent::noteOn:
            capture.noteOn (e.at.ppq, e.channel, e.data1, e.data2);
            sawNoteSinceTrigger = true;
            break;
        case CaptureEvent::noteOff:       capture.noteOff (e.at.ppq, e.channel, e.data1); break;
        case CaptureEvent::programChange: capture.programChange (e.channel, e.data1); break;
        case CaptureEvent::jump:          capture.jumpedTo (e.at.ppq); break;
        case CaptureEvent::stop:
            capture.stoppedAt (e.at.ppq);
            prepareAsIfPressedAt (e.at); // stopped mid-bar: the bar-line prepare missed this bar's notes
            break;
        case CaptureEvent::trigger:       handleTrigger (e.at); break;
        case CaptureEvent::barLine:       prepareAsIfPressedAt (e.at); break;
        case CaptureEvent::position:      break;
    }
    capture.forgetBefore (e.at.ppq - keepBars * e.at.beatsPerBar());
}

Clip SegueBridge::clipForTrigger (const TransportInfo& at, const RequestSettings& settings) const
{
    std::optional<Clip> file;
    {
        std::lock_guard<std::mutex> guard (lock);
        file = fileClip;
    }
    if (file.has_value())
    {
        Clip clip = *file;
        clip.startPpq = clipEndForTrigger (at, false) - clip.lengthBeats;
        return clip;
    }
    const double barStart = barStartAtOrBefore (at, at.ppq);
    const double end = clipEndForTrigger (at, capture.anyNoteOnIn (barStart, at.ppq + 1.0e-9));
    return capture.clipBetween (end - settings.clipBars * at.beatsPerBar(), end, at.ppq, at);
}

void SegueBridge::handleTrigger (const TransportInfo& at)
{
    const auto settings = getSettings();
    auto clip = clipForTrigger (at, settings);
    if (clip.notes.empty())
    {
        std::lock_guard<std::mutex> guard (lock);
        setErrorLocked ("Nothing was played through Segue in the " + juce::String (settings.clipBars)
                        + " bars before Continue. Play a clip through the plugin (or drop a .mid on it), then press Continue.");
        return;
    }
    sendContinue (std::move (clip));
}

void SegueBridge::prepareAsIfPressedAt (const TransportInfo& at)
{
    if (! current.over)
        return; // a continue is running: the server is busy with it, and prepares would only wait
    const auto settings = getSettings();
    sendPrepare (clipForTrigger (at, settings), settings);
}

void SegueBridge::prepareFileClipIfPending()
{
    if (! prepareFilePending || ! current.over)
        return;
    std::optional<Clip> file;
    {
        std::lock_guard<std::mutex> guard (lock);
        if (state.link != BridgeSnapshot::Link::connected)
            return; // sent once a server answers
        file = fileClip;
    }
    prepareFilePending = false;
    if (file.has_value())
        sendPrepare (*file, getSettings());
}

// --- requests ------------------------------------------------------------------------------------------

void SegueBridge::sendContinue (Clip clip)
{
    const auto settings = getSettings();
    const std::pair<int, int> meter { clip.numerator, clip.denominator };
    if (! modelMeters.empty() && std::find (modelMeters.begin(), modelMeters.end(), meter) == modelMeters.end())
    {
        juce::StringArray known;
        for (const auto& [n, d] : modelMeters)
            known.add (juce::String (n) + "/" + juce::String (d));
        std::lock_guard<std::mutex> guard (lock);
        setErrorLocked ("The model " + state.modelName + " has never seen bars of " + juce::String (meter.first) + "/"
                        + juce::String (meter.second) + " (it knows " + known.joinIntoString (", ")
                        + "). Change the meter or load another model.");
        return;
    }
    const auto id = sessionPrefix + "-" + juce::String (++requestCounter);
    const auto json = continueJson (clip, settings);
    const double now = nowMs();

    current = Request {};
    current.id = id;
    current.clipStartPpq = clip.startPpq;
    current.outChannel = clip.isDrum ? 9 : clip.mainChannel();
    current.sentMs = now;
    current.over = false;
    current.bars = settings.bars;
    current.clip = clip;
    upload.reset();
    sawNoteSinceTrigger = false;
    overflow.push_back (PlayerCommand { PlayerCommand::clearAll, {} }); // the previous continuation stops
    flushToAudio();

    // An unfinished prepare upload would only compete with this one; a waiting prepare runs after
    // this continue (the server puts generation first). The server keeps this clip's prefill too.
    dropPrepareUpload();
    lastPrepareId.clear();
    lastPreparedRequest = json; // the server draws this one ahead again, for Generate again

    {
        std::lock_guard<std::mutex> guard (lock);
        state.tiles.clear();
        generatedPreview.clear();
        state.error.clear();
        state.prepared.clear();
        state.running = true;
        state.firstNoteMs = -1.0;
        state.serverFirstNoteMs = -1.0;
        state.clipSource = clip.source;
        state.status = "Continuing " + juce::String ((int) clip.notes.size()) + " notes by " + juce::String (settings.bars)
                       + (settings.bars == 1 ? " bar..." : " bars...");
    }

    switch (sendJson (SEGUE_OSC_CONTINUE, SEGUE_TAGS_CONTINUE, SEGUE_OSC_CONTINUE_CHUNK, SEGUE_TAGS_CONTINUE_CHUNK, id, json,
                      upload, now))
    {
        case SendResult::sent:
        case SendResult::uploading:
            return;
        case SendResult::tooLarge:
        {
            current.over = true;
            std::lock_guard<std::mutex> guard (lock);
            setErrorLocked ("The clip is too large to send (" + juce::String ((juce::int64) json.size())
                            + " bytes of request, at most " + juce::String (SEGUE_UPLOAD_MAX_BYTES) + "). Use fewer bars.");
            return;
        }
        case SendResult::failed:
        {
            current.over = true;
            std::lock_guard<std::mutex> guard (lock);
            setErrorLocked ("Could not send the request to 127.0.0.1:" + juce::String (connectedPort) + ".");
            return;
        }
    }
}

void SegueBridge::sendPrepare (const Clip& clip, const RequestSettings& settings)
{
    if (clip.notes.empty() || prepareUnsupported || ! current.over)
        return;
    {
        std::lock_guard<std::mutex> guard (lock);
        if (state.link != BridgeSnapshot::Link::connected)
            return;
    }
    const std::pair<int, int> meter { clip.numerator, clip.denominator };
    if (! modelMeters.empty() && std::find (modelMeters.begin(), modelMeters.end(), meter) == modelMeters.end())
        return; // nothing to prefill: a Continue of it says why
    // The very JSON the Continue will send: the server prefills its clip and draws that continuation up
    // to its first note (a head start, docs/protocol.md 3.9), so a changed setting is worth a prepare too.
    auto json = continueJson (clip, settings);
    if (json == lastPreparedRequest)
        return; // the server has this very request ready already (prepared, or continued)

    dropPrepareUpload();
    const auto id = sessionPrefix + "-p" + juce::String (++prepareCounter);
    const auto result = sendJson (SEGUE_OSC_PREPARE, SEGUE_TAGS_PREPARE, SEGUE_OSC_PREPARE_CHUNK, SEGUE_TAGS_PREPARE_CHUNK,
                                  id, json, prepareUpload, nowMs());
    if (result != SendResult::sent && result != SendResult::uploading)
        return; // a prepare only saves time: its Continue prefills the clip itself
    lastPreparedRequest = std::move (json);
    lastPrepareId = id;
    std::lock_guard<std::mutex> guard (lock);
    state.prepared = "preparing " + juce::String ((int) clip.notes.size()) + " notes...";
}

void SegueBridge::dropPrepareUpload()
{
    if (! prepareUpload.has_value())
        return;
    send (request (SEGUE_OSC_CANCEL, prepareUpload->id)); // the server drops the unfinished upload
    prepareUpload.reset();
}

SegueBridge::SendResult SegueBridge::sendJson (const char* address, const char* tags, const char* chunkAddress,
                                                const char* chunkTags, const juce::String& id, const std::string& json,
                                                std::optional<Upload>& slot, double now)
{
    slot.reset();
    const size_t idSize = oscStringSize ((size_t) id.getNumBytesAsUTF8());
    const size_t single = oscStringSize (std::strlen (address)) + oscStringSize (std::strlen (tags)) + 4 + idSize
                          + oscStringSize (json.size());
    if (single <= (size_t) SEGUE_CLIENT_MAX_DATAGRAM)
    {
        auto m = request (address, id);
        m.addString (juce::String::fromUTF8 (json.data(), (int) json.size()));
        return send (m) ? SendResult::sent : SendResult::failed;
    }

    // Too large for one datagram a Mac could send: the chunked upload of protocol.md section 6.4.
    if (json.size() > (size_t) SEGUE_UPLOAD_MAX_BYTES)
        return SendResult::tooLarge;
    const size_t overhead = oscStringSize (std::strlen (chunkAddress)) + oscStringSize (std::strlen (chunkTags)) + 12
                            + idSize + 4;
    const size_t pieceSize = (size_t) SEGUE_CLIENT_MAX_DATAGRAM - overhead;
    Upload u;
    u.address = chunkAddress;
    u.id = id;
    for (size_t at = 0; at < json.size(); at += pieceSize)
        u.pieces.push_back (json.substr (at, pieceSize)); // ASCII JSON: any cut is valid UTF-8
    u.acked.assign (u.pieces.size(), false);
    u.lastProgressMs = now;
    slot = std::move (u);
    sendChunks (*slot, false);
    return SendResult::uploading;
}

void SegueBridge::sendChunks (Upload& u, bool resend)
{
    const int count = (int) u.pieces.size();
    const auto sendPiece = [&] (int index) {
        auto m = request (u.address, u.id);
        m.addInt32 (index);
        m.addInt32 (count);
        m.addString (juce::String::fromUTF8 (u.pieces[(size_t) index].data(), (int) u.pieces[(size_t) index].size()));
        send (m);
    };
    if (resend)
        for (int i = 0; i < u.nextToSend; ++i)
            if (! u.acked[(size_t) i])
                sendPiece (i);
    while (u.nextToSend < count && u.nextToSend - u.ackedCount < SEGUE_CLIENT_WINDOW)
        sendPiece (u.nextToSend++);
}

void SegueBridge::serviceUpload (double now)
{
    const auto stalled = [now] (const std::optional<Upload>& u) {
        return u.has_value() && now - u->lastProgressMs >= SEGUE_CLIENT_ACK_TIMEOUT_S * 1000.0;
    };
    if (stalled (prepareUpload))
    {
        if (++prepareUpload->stalls > SEGUE_CLIENT_RETRIES)
        {
            // A prepare is only a head start: give up quietly, and try again at the next bar line.
            prepareUpload.reset();
            lastPreparedRequest.clear();
            std::lock_guard<std::mutex> guard (lock);
            state.prepared.clear();
        }
        else
        {
            prepareUpload->lastProgressMs = now;
            sendChunks (*prepareUpload, true);
        }
    }
    if (! stalled (upload))
        return;
    if (++upload->stalls > SEGUE_CLIENT_RETRIES)
    {
        const auto sent = upload->ackedCount;
        const auto count = (int) upload->pieces.size();
        upload.reset();
        current.over = true;
        std::lock_guard<std::mutex> guard (lock);
        setErrorLocked ("segue serve stopped acknowledging the clip upload (" + juce::String (sent) + " of "
                        + juce::String (count) + " pieces arrived). Is it still running?");
        return;
    }
    upload->lastProgressMs = now;
    sendChunks (*upload, true);
}

// --- replies ---------------------------------------------------------------------------------------------

void SegueBridge::handleReply (const juce::OSCMessage& m)
{
    const double now = nowMs();
    lastHeardMs = now;
    const auto address = m.getAddressPattern().toString();
    const auto id = argString (m, 0);

    if (isReply (m, SEGUE_OSC_REPLY_HELLO, SEGUE_HELLO_ARG_DEFAULT_MODEL + 1))
    {
        const int protocolVersion = argInt (m, SEGUE_HELLO_ARG_PROTOCOL);
        const auto models = juce::JSON::parse (argString (m, SEGUE_HELLO_ARG_MODELS));
        const auto defaultModel = argString (m, SEGUE_HELLO_ARG_DEFAULT_MODEL);
        modelMeters.clear();
        juce::StringArray names;
        if (const auto* list = models.getArray())
        {
            for (const auto& model : *list)
            {
                names.add (model.getProperty ("name", juce::var()).toString());
                if (names.strings.getLast() != defaultModel)
                    continue;
                if (const auto* meters = model.getProperty ("meters", juce::var()).getArray())
                    for (const auto& meter : *meters)
                        if (const auto* pair = meter.getArray(); pair != nullptr && pair->size() == 2)
                            modelMeters.push_back ({ (int) (*pair)[0], (int) (*pair)[1] });
            }
        }

        // A different instance: the server restarted and forgot the request we are waiting for.
        const auto instance = argString (m, SEGUE_HELLO_ARG_INSTANCE);
        const bool restarted = serverInstance.isNotEmpty() && instance.isNotEmpty() && instance != serverInstance;
        serverInstance = instance;
        if (restarted) // a restart forgets every prefill: prepare again
        {
            prepareUpload.reset();
            lastPrepareId.clear();
            lastPreparedRequest.clear();
            prepareUnsupported = false;
            std::lock_guard<std::mutex> guard (lock);
            prepareFilePending = fileClip.has_value();
            state.prepared.clear();
        }
        if (restarted && ! current.over && protocolVersion == SEGUE_PROTOCOL_VERSION)
        {
            {
                std::lock_guard<std::mutex> guard (lock);
                state.status = "segue serve restarted; sending the request again...";
            }
            sendContinue (current.clip);
        }

        std::lock_guard<std::mutex> guard (lock);
        state.models = names;
        state.serverVersion = argString (m, SEGUE_HELLO_ARG_SERVER);
        state.modelName = defaultModel;
        if (protocolVersion != SEGUE_PROTOCOL_VERSION)
        {
            state.link = BridgeSnapshot::Link::wrongProtocol;
            state.error = "This segue serve speaks protocol " + juce::String (protocolVersion) + "; this plugin speaks "
                          + juce::String (SEGUE_PROTOCOL_VERSION) + ". Update the one that is older.";
            return;
        }
        if (state.link != BridgeSnapshot::Link::connected && ! state.running)
            state.status = fileClip.has_value() ? "Ready: press Continue to continue " + fileClip->source + "."
                                                : juce::String ("Ready. Play a clip through Segue (or drop a .mid here), then press Continue.");
        if (state.link != BridgeSnapshot::Link::connected && state.error.startsWith ("No Segue server"))
            state.error.clear();
        state.link = BridgeSnapshot::Link::connected;
        return;
    }
    if (isReply (m, SEGUE_OSC_REPLY_PONG, argCount (SEGUE_TAGS_REPLY_PONG)))
    {
        bool wasLost = false;
        {
            std::lock_guard<std::mutex> guard (lock);
            wasLost = state.link != BridgeSnapshot::Link::connected;
        }
        if (wasLost)
            sendHello(); // the server came (back): read its models again
        return;
    }
    if (isReply (m, SEGUE_OSC_REPLY_CHUNK_ACK, argCount (SEGUE_TAGS_REPLY_CHUNK_ACK)))
    {
        for (auto* slot : { &upload, &prepareUpload })
        {
            if (! slot->has_value() || (*slot)->id != id)
                continue;
            auto& u = **slot;
            const int index = argInt (m, SEGUE_CHUNK_ACK_ARG_INDEX);
            if (index >= 0 && index < (int) u.acked.size() && ! u.acked[(size_t) index])
            {
                u.acked[(size_t) index] = true;
                ++u.ackedCount;
                u.lastProgressMs = now;
                u.stalls = 0;
            }
            if (u.ackedCount == (int) u.pieces.size())
                slot->reset(); // the stream (or `prepared`) follows
            else
                sendChunks (u, false);
        }
        return;
    }

    // A prepare's replies only say how far ahead the server is; they never touch a continue's state.
    if (isPrepareId (id))
    {
        if (id != lastPrepareId)
            return; // an older prepare (replaced, or overtaken by a Continue)
        if (isReply (m, SEGUE_OSC_REPLY_PREPARED, argCount (SEGUE_TAGS_REPLY_PREPARED)))
        {
            lastPrepareId.clear();
            std::lock_guard<std::mutex> guard (lock);
            state.prepared = "clip prepared: Continue starts at once";
        }
        else if (isReply (m, SEGUE_OSC_REPLY_ERROR, argCount (SEGUE_TAGS_REPLY_ERROR)))
        {
            const auto code = argString (m, SEGUE_ERROR_ARG_CODE);
            lastPrepareId.clear();
            if (prepareUpload.has_value() && prepareUpload->id == id)
                prepareUpload.reset();
            if (code == SEGUE_ERROR_UNKNOWN_TYPE)
                prepareUnsupported = true; // a server older than prepare: each Continue prefills its clip
            else if (code == SEGUE_ERROR_BUSY)
                lastPreparedRequest.clear(); // try again at the next bar line
            std::lock_guard<std::mutex> guard (lock);
            state.prepared = code == SEGUE_ERROR_UNKNOWN_TYPE || state.running
                                 ? juce::String()
                                 : "not prepared: " + argString (m, SEGUE_ERROR_ARG_MESSAGE);
        }
        else if (isReply (m, SEGUE_OSC_REPLY_CANCELLED, argCount (SEGUE_TAGS_REPLY_CANCELLED)))
        {
            lastPrepareId.clear();
            std::lock_guard<std::mutex> guard (lock);
            state.prepared.clear();
        }
        return;
    }

    // Everything else answers a continue: only the current one counts, and nothing after its end.
    if (isReply (m, SEGUE_OSC_REPLY_ERROR, argCount (SEGUE_TAGS_REPLY_ERROR)) && id.isEmpty())
    {
        std::lock_guard<std::mutex> guard (lock);
        state.error = argString (m, SEGUE_ERROR_ARG_MESSAGE);
        return;
    }
    if (id != current.id || current.over)
        return;

    if (isReply (m, SEGUE_OSC_REPLY_NOTE, argCount (SEGUE_TAGS_REPLY_NOTE)))
    {
        const int variation = argInt (m, SEGUE_NOTE_ARG_VARIATION);
        const double start = argFloat (m, SEGUE_NOTE_ARG_START);
        const double duration = std::max (1.0 / 64.0, argFloat (m, SEGUE_NOTE_ARG_DURATION));
        const int pitch = juce::jlimit (0, 127, argInt (m, SEGUE_NOTE_ARG_PITCH));
        const int velocity = juce::jlimit (1, 127, argInt (m, SEGUE_NOTE_ARG_VELOCITY));
        const bool first = ! current.gotNote;
        current.gotNote = true;
        if (variation == 0) // the first variation plays; every variation becomes a tile
        {
            ScheduledNote note;
            note.onPpq = current.clipStartPpq + start;
            note.offPpq = note.onPpq + duration;
            note.channel = (std::uint8_t) current.outChannel;
            note.pitch = (std::uint8_t) pitch;
            note.velocity = (std::uint8_t) velocity;
            overflow.push_back (PlayerCommand { PlayerCommand::addNote, note });
        }
        std::lock_guard<std::mutex> guard (lock);
        if (first)
            state.firstNoteMs = now - current.sentMs;
        if (variation == 0)
            generatedPreview.push_back ({ start, duration, pitch, true });
        return;
    }
    if (isReply (m, SEGUE_OSC_REPLY_DONE, argCount (SEGUE_TAGS_REPLY_DONE)))
    {
        BridgeSnapshot::Tile tile;
        tile.variation = argInt (m, SEGUE_DONE_ARG_VARIATION);
        tile.notes = argInt (m, SEGUE_DONE_ARG_NOTES);
        tile.path = argString (m, SEGUE_DONE_ARG_PATH);
        std::lock_guard<std::mutex> guard (lock);
        state.serverFirstNoteMs = argFloat (m, SEGUE_DONE_ARG_FIRST_NOTE_MS);
        state.tiles.push_back (tile);
        std::sort (state.tiles.begin(), state.tiles.end(),
                   [] (const auto& a, const auto& b) { return a.variation < b.variation; });
        return;
    }
    if (isReply (m, SEGUE_OSC_REPLY_FINISHED, argCount (SEGUE_TAGS_REPLY_FINISHED)))
    {
        current.over = true;
        const int variations = argInt (m, SEGUE_FINISHED_ARG_VARIATIONS);
        std::lock_guard<std::mutex> guard (lock);
        state.running = false;
        state.status = "Done: " + juce::String (variations) + (variations == 1 ? " variation" : " variations")
                       + " in " + juce::String (juce::roundToInt (argFloat (m, SEGUE_FINISHED_ARG_TOTAL_MS)))
                       + " ms. Drag a tile onto a track.";
        return;
    }
    if (isReply (m, SEGUE_OSC_REPLY_ERROR, argCount (SEGUE_TAGS_REPLY_ERROR)))
    {
        current.over = true;
        upload.reset();
        std::lock_guard<std::mutex> guard (lock);
        setErrorLocked (argString (m, SEGUE_ERROR_ARG_MESSAGE) + " (" + argString (m, SEGUE_ERROR_ARG_CODE) + ")");
        state.status = "The server refused the request.";
        return;
    }
    if (isReply (m, SEGUE_OSC_REPLY_CANCELLED, argCount (SEGUE_TAGS_REPLY_CANCELLED)))
    {
        current.over = true;
        std::lock_guard<std::mutex> guard (lock);
        state.running = false;
        state.status = "Cancelled.";
        return;
    }
    juce::ignoreUnused (address); // an unknown reply from a newer server: ignored (protocol.md 9.7)
}

void SegueBridge::flushToAudio()
{
    while (! overflow.empty() && toAudio.push (overflow.front()))
        overflow.pop_front();
}

// --- the server's presence ----------------------------------------------------------------------------------

void SegueBridge::serviceConnection (double now)
{
    if (replyPort <= 0)
        return;
    BridgeSnapshot::Link link;
    {
        std::lock_guard<std::mutex> guard (lock);
        link = state.link;
    }
    const double silentFor = lastHeardMs < 0.0 ? now - firstHelloMs : now - lastHeardMs;

    if (link == BridgeSnapshot::Link::connected)
    {
        // While a stream is quiet, and now and then when idle, hello again: its `instance` tells a
        // busy server (same) from a restarted one (different, and our request is gone).
        const double every = current.over ? keepAliveMs : quietStreamMs;
        if (silentFor > every && now - lastHelloMs > every)
            sendHello();
        if (silentFor > lostAfterMs)
        {
            std::lock_guard<std::mutex> guard (lock);
            state.link = BridgeSnapshot::Link::noServer;
            state.error = "No Segue server answers on 127.0.0.1:" + juce::String (connectedPort)
                          + " any more. Start one in a terminal: " + startCommandLocked();
        }
        return;
    }

    if (now - lastHelloMs > helloTimeoutMs)
        sendHello();
    if (link == BridgeSnapshot::Link::connecting && silentFor > helloTimeoutMs)
    {
        {
            std::lock_guard<std::mutex> guard (lock);
            state.link = BridgeSnapshot::Link::noServer;
            state.error = "No Segue server answers on 127.0.0.1:" + juce::String (connectedPort)
                          + ". Start one in a terminal: " + startCommandLocked()
                          + (serverCommand.isEmpty() ? "  (or set the path to segue below and Segue starts it)" : "");
        }
        maybeStartServer (now);
    }
    if (serverProcess != nullptr && ! serverProcess->isRunning() && link != BridgeSnapshot::Link::connected)
    {
        const auto code = serverProcess->getExitCode();
        serverProcess.reset();
        std::lock_guard<std::mutex> guard (lock);
        state.serverStartedByUs = false;
        state.error = "segue serve exited (code " + juce::String ((int) code)
                      + "); its log is in ~/Segue/segue-serve.log.";
    }
}

void SegueBridge::maybeStartServer (double now)
{
    juce::String command;
    int port = 0;
    {
        std::lock_guard<std::mutex> guard (lock);
        command = serverCommand;
        port = serverPort;
    }
    if (command.isEmpty() || triedStart || (serverProcess != nullptr && serverProcess->isRunning()))
        return;
    triedStart = true;

    auto logFile = juce::File::getSpecialLocation (juce::File::userHomeDirectory).getChildFile ("Segue/segue-serve.log");
    logFile.getParentDirectory().createDirectory();
    serverProcess = std::make_unique<juce::ChildProcess>();
   #if JUCE_WINDOWS
    const bool started = serverProcess->start (juce::StringArray { command, "serve", "--osc-port", juce::String (port) }, 0);
   #else
    // exec: the shell becomes segue serve, so stopping it stops the server; its output goes to the log.
    const auto line = "exec " + shellQuote (command) + " serve --osc-port " + juce::String (port) + " >> "
                      + shellQuote (logFile.getFullPathName()) + " 2>&1";
    const bool started = serverProcess->start (juce::StringArray { "/bin/sh", "-c", line }, 0);
   #endif
    std::lock_guard<std::mutex> guard (lock);
    if (started)
    {
        state.serverStartedByUs = true;
        state.link = BridgeSnapshot::Link::connecting;
        state.error.clear();
        state.status = "Starting " + command + " serve (log: " + logFile.getFullPathName() + ")...";
        firstHelloMs = now + 8000.0; // give it time to load and verify its models
    }
    else
    {
        serverProcess.reset();
        state.error = "Could not start " + command + ". Check the path, or start segue serve in a terminal.";
    }
}

// --- what the editor draws ----------------------------------------------------------------------------------

void SegueBridge::updatePreview (double now)
{
    if (now - lastPreviewMs < previewEveryMs)
        return;
    lastPreviewMs = now;

    std::optional<Clip> file;
    std::vector<BridgeSnapshot::PreviewNote> generated;
    {
        std::lock_guard<std::mutex> guard (lock);
        file = fileClip;
        generated = generatedPreview;
    }
    const auto clipBars = getSettings().clipBars;
    Clip shown;
    const bool showRequest = current.id.isNotEmpty();
    if (showRequest)
        shown = current.clip;
    else if (file.has_value())
        shown = *file;
    else
    {
        const double end = barStartAtOrBefore (lastTransport, lastTransport.ppq) + lastTransport.beatsPerBar();
        shown = capture.clipBetween (end - clipBars * lastTransport.beatsPerBar(), end, lastTransport.ppq, lastTransport);
        if (shown.notes.empty())
            shown.source.clear();
    }

    std::vector<BridgeSnapshot::PreviewNote> preview;
    preview.reserve (shown.notes.size() + generated.size());
    for (const auto& n : shown.notes)
        preview.push_back ({ n.start, n.duration, n.pitch, false });
    if (showRequest)
        preview.insert (preview.end(), generated.begin(), generated.end());

    std::lock_guard<std::mutex> guard (lock);
    state.preview = std::move (preview);
    state.previewLengthBeats = shown.lengthBeats;
    state.beatsPerBar = shown.numerator * 4.0 / shown.denominator;
    state.previewTotalBeats = shown.lengthBeats + (showRequest ? current.bars * state.beatsPerBar : 0.0);
    state.clipSource = shown.source;
    state.hostTransport = lastTransport.fromHost;
}

} // namespace segue
