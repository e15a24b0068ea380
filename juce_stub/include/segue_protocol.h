/* segue_protocol.h: the Segue wire contract (docs/protocol.md) for C and C++ shells.
 *
 * OSC addresses, type tags, reply argument positions, error codes and limits of `segue serve`,
 * version 1. Plain C macros, so a Max external or any C program can include it as well as the JUCE
 * plugin. tests/test_protocol_header.py reads every macro here and compares it with the Python code
 * (plugin_bridge/osc_messages.py, protocol.py, osc_guard.py, osc_chunks.py, osc_client.py,
 * options.py, engine/request.py, engine/constraints.py): change the protocol there and that test
 * names the line to change here.
 *
 * Conventions (docs/protocol.md section 6.1): every request starts with the client's reply port
 * (int32) and the request id (string); replies go to (sender IP, reply port), from another port.
 */
#ifndef SEGUE_PROTOCOL_H
#define SEGUE_PROTOCOL_H

/* ---- versions and ports ---------------------------------------------------------------------- */
#define SEGUE_PROTOCOL_VERSION 1
#define SEGUE_DEFAULT_OSC_PORT 9100
#define SEGUE_DEFAULT_HOST "127.0.0.1"

/* ---- requests (client -> server port) ------------------------------------------------------- */
#define SEGUE_OSC_PREFIX "/segue/"
#define SEGUE_OSC_HELLO "/segue/hello"
#define SEGUE_OSC_PING "/segue/ping"
#define SEGUE_OSC_CANCEL "/segue/cancel"
#define SEGUE_OSC_CONTINUE "/segue/continue"
#define SEGUE_OSC_CONTINUE_CHUNK "/segue/continue/chunk"
#define SEGUE_OSC_PREPARE "/segue/prepare"             /* a clip to prefill before it is continued */
#define SEGUE_OSC_PREPARE_CHUNK "/segue/prepare/chunk"

#define SEGUE_TAGS_HELLO ",is"            /* reply_port id */
#define SEGUE_TAGS_PING ",is"             /* reply_port id */
#define SEGUE_TAGS_CANCEL ",is"           /* reply_port id ("" = whatever this client has running) */
#define SEGUE_TAGS_CONTINUE ",iss"        /* reply_port id json */
#define SEGUE_TAGS_CONTINUE_CHUNK ",isiis" /* reply_port id index count data */
#define SEGUE_TAGS_PREPARE ",iss"          /* reply_port id json ({"clip": ...}) */
#define SEGUE_TAGS_PREPARE_CHUNK ",isiis"  /* reply_port id index count data */

/* ---- replies (server -> sender IP : reply_port) --------------------------------------------- */
/* Each reply: its address, its type tags (without the comma), its field names in order, and the
 * position of every field among the arguments. Newer servers may add fields at the end: read by
 * position and accept more arguments than listed (and, from an older server, fewer: `instance`
 * was appended to hello). */
#define SEGUE_OSC_REPLY_HELLO "/segue/hello"
#define SEGUE_TAGS_REPLY_HELLO "sissss"
#define SEGUE_FIELDS_REPLY_HELLO "id protocol server models default_model instance"
#define SEGUE_HELLO_ARG_ID 0
#define SEGUE_HELLO_ARG_PROTOCOL 1
#define SEGUE_HELLO_ARG_SERVER 2
#define SEGUE_HELLO_ARG_MODELS 3        /* JSON text: an array of model objects */
#define SEGUE_HELLO_ARG_DEFAULT_MODEL 4 /* "" = none */
#define SEGUE_HELLO_ARG_INSTANCE 5      /* 16 hex digits, new at every server start (older servers: absent) */

#define SEGUE_OSC_REPLY_PONG "/segue/pong"
#define SEGUE_TAGS_REPLY_PONG "s"
#define SEGUE_FIELDS_REPLY_PONG "id"
#define SEGUE_PONG_ARG_ID 0

#define SEGUE_OSC_REPLY_NOTE "/segue/note"
#define SEGUE_TAGS_REPLY_NOTE "siiiffii"
#define SEGUE_FIELDS_REPLY_NOTE "id variation pitch velocity start duration channel track"
#define SEGUE_NOTE_ARG_ID 0
#define SEGUE_NOTE_ARG_VARIATION 1
#define SEGUE_NOTE_ARG_PITCH 2
#define SEGUE_NOTE_ARG_VELOCITY 3
#define SEGUE_NOTE_ARG_START 4    /* beats from the clip start (float32) */
#define SEGUE_NOTE_ARG_DURATION 5 /* beats (float32) */
#define SEGUE_NOTE_ARG_CHANNEL 6
#define SEGUE_NOTE_ARG_TRACK 7

#define SEGUE_OSC_REPLY_DONE "/segue/done"
#define SEGUE_TAGS_REPLY_DONE "sisiff"
#define SEGUE_FIELDS_REPLY_DONE "id variation path notes first_note_ms total_ms"
#define SEGUE_DONE_ARG_ID 0
#define SEGUE_DONE_ARG_VARIATION 1
#define SEGUE_DONE_ARG_PATH 2
#define SEGUE_DONE_ARG_NOTES 3
#define SEGUE_DONE_ARG_FIRST_NOTE_MS 4 /* < 0 = no note yet */
#define SEGUE_DONE_ARG_TOTAL_MS 5

#define SEGUE_OSC_REPLY_FINISHED "/segue/finished"
#define SEGUE_TAGS_REPLY_FINISHED "sif"
#define SEGUE_FIELDS_REPLY_FINISHED "id variations total_ms"
#define SEGUE_FINISHED_ARG_ID 0
#define SEGUE_FINISHED_ARG_VARIATIONS 1
#define SEGUE_FINISHED_ARG_TOTAL_MS 2

#define SEGUE_OSC_REPLY_ERROR "/segue/error"
#define SEGUE_TAGS_REPLY_ERROR "sss"
#define SEGUE_FIELDS_REPLY_ERROR "id code message"
#define SEGUE_ERROR_ARG_ID 0
#define SEGUE_ERROR_ARG_CODE 1
#define SEGUE_ERROR_ARG_MESSAGE 2

#define SEGUE_OSC_REPLY_CANCELLED "/segue/cancelled"
#define SEGUE_TAGS_REPLY_CANCELLED "s"
#define SEGUE_FIELDS_REPLY_CANCELLED "id"
#define SEGUE_CANCELLED_ARG_ID 0

#define SEGUE_OSC_REPLY_CHUNK_ACK "/segue/chunk_ack"
#define SEGUE_TAGS_REPLY_CHUNK_ACK "siii"
#define SEGUE_FIELDS_REPLY_CHUNK_ACK "id index received count"
#define SEGUE_CHUNK_ACK_ARG_ID 0
#define SEGUE_CHUNK_ACK_ARG_INDEX 1
#define SEGUE_CHUNK_ACK_ARG_RECEIVED 2
#define SEGUE_CHUNK_ACK_ARG_COUNT 3

#define SEGUE_OSC_REPLY_PREPARED "/segue/prepared"
#define SEGUE_TAGS_REPLY_PREPARED "ssiiff"
#define SEGUE_FIELDS_REPLY_PREPARED "id model tokens cached prefill_ms total_ms"
#define SEGUE_PREPARED_ARG_ID 0
#define SEGUE_PREPARED_ARG_MODEL 1
#define SEGUE_PREPARED_ARG_TOKENS 2
#define SEGUE_PREPARED_ARG_CACHED 3 /* int32 1 or 0 */
#define SEGUE_PREPARED_ARG_PREFILL_MS 4
#define SEGUE_PREPARED_ARG_TOTAL_MS 5

/* ---- error codes (docs/protocol.md section 7) ----------------------------------------------- */
#define SEGUE_ERROR_BAD_REQUEST "bad_request"
#define SEGUE_ERROR_BAD_CLIP "bad_clip"
#define SEGUE_ERROR_UNKNOWN_MODEL "unknown_model"
#define SEGUE_ERROR_UNKNOWN_TYPE "unknown_type"
#define SEGUE_ERROR_TOO_LARGE "too_large"
#define SEGUE_ERROR_BUSY "busy"
#define SEGUE_ERROR_INTERNAL "internal"

/* ---- limits (docs/protocol.md section 8) ---------------------------------------------------- */
#define SEGUE_MAX_ID_LENGTH 64
#define SEGUE_MAX_NOTES_PER_CLIP 20000
#define SEGUE_MAX_CLIP_BEATS 4096
#define SEGUE_MAX_TRACKS 16
#define SEGUE_MAX_BARS 64
#define SEGUE_MAX_VARIATIONS 16
#define SEGUE_MAX_BEAM_WIDTH 16
#define SEGUE_MAX_REPLY_BYTES 8192
#define SEGUE_MAX_ERROR_MESSAGE_CHARS 1000
#define SEGUE_MAX_MESSAGE_CHARS 300 /* an error message echoes at most this much of a request */
#define SEGUE_MAX_ADDRESS_LENGTH 256
#define SEGUE_MAX_ARGUMENTS 64

/* A chunked upload (section 6.4): the server's limits ... */
#define SEGUE_UPLOAD_MAX_BYTES 1048576
#define SEGUE_UPLOAD_MAX_CHUNKS 1024
#define SEGUE_UPLOAD_MAX_PER_CLIENT 4
#define SEGUE_UPLOAD_TIMEOUT_S 10.0
/* ... and how a client paces it (the defaults of plugin_bridge/osc_client.py's OscClient). */
#define SEGUE_CLIENT_MAX_DATAGRAM 8000
#define SEGUE_CLIENT_WINDOW 8
#define SEGUE_CLIENT_ACK_TIMEOUT_S 1.0
#define SEGUE_CLIENT_RETRIES 3
#define SEGUE_CLIENT_SILENCE_S 10.0

/* ---- request values --------------------------------------------------------------------------- */
#define SEGUE_TEMPERATURE_MAX 5.0
/* The scales a `constraints.scale` may name, in the server's order, separated by '|'. */
#define SEGUE_SCALES "major|minor|harmonic_minor|dorian|mixolydian|pentatonic_major|pentatonic_minor|blues|chromatic"

#endif /* SEGUE_PROTOCOL_H */
