/// An error from the AMQP client: a refused connection, a server-closed channel, a nacked publish.
///
/// Errors carry a ``Code`` (what kind of failure), a human-readable ``message`` naming what was
/// wrong, and, when the broker closed a channel or the connection, its reply code and text.
public struct AMQPError: Error, Sendable, Hashable, CustomStringConvertible {
    /// The kind of failure. New codes may be added; switch with a `default`.
    public struct Code: Hashable, Sendable, CustomStringConvertible {
        private enum Base: String, Hashable, Sendable {
            case invalidURL, invalidArgument, connectionFailed, authenticationFailed, accessRefused
            case tlsFailed, connectionClosedByServer, connectionLost, connectionClosed, notConnected
            case channelClosedByServer, consumerCancelled, publishNacked, timeout, protocolError
        }
        private let base: Base
        private init(_ base: Base) { self.base = base }

        /// The connection URL could not be parsed.
        public static let invalidURL = Code(.invalidURL)
        /// An argument the client can check before talking to the broker was wrong.
        public static let invalidArgument = Code(.invalidArgument)
        /// The TCP or TLS connection could not be opened (refused, unreachable, DNS failure).
        public static let connectionFailed = Code(.connectionFailed)
        /// The broker refused the user name or password.
        public static let authenticationFailed = Code(.authenticationFailed)
        /// The broker refused access, for example to a virtual host that does not exist.
        public static let accessRefused = Code(.accessRefused)
        /// TLS could not be set up (CA file, certificate, key, handshake).
        public static let tlsFailed = Code(.tlsFailed)
        /// The broker closed the connection (`connection.close`), e.g. `rabbitmqctl close_connection`.
        public static let connectionClosedByServer = Code(.connectionClosedByServer)
        /// The connection broke: socket error, missed heartbeats, RPC timeout.
        public static let connectionLost = Code(.connectionLost)
        /// The connection was closed by this application.
        public static let connectionClosed = Code(.connectionClosed)
        /// The connection is reconnecting; the operation was not attempted.
        public static let notConnected = Code(.notConnected)
        /// The broker closed the channel (`channel.close`): a missing exchange, inequivalent
        /// arguments, an unknown delivery tag. The client reopens the channel.
        public static let channelClosedByServer = Code(.channelClosedByServer)
        /// The broker cancelled the consumer, for example because its queue was deleted.
        public static let consumerCancelled = Code(.consumerCancelled)
        /// The broker answered a publish with `basic.nack`: it did not take the message.
        public static let publishNacked = Code(.publishNacked)
        /// An operation did not finish in time.
        public static let timeout = Code(.timeout)
        /// The broker sent something the client did not expect.
        public static let protocolError = Code(.protocolError)

        public var description: String { self.base.rawValue }
    }

    /// Reply codes the broker uses when it closes a channel or connection.
    public struct ReplyCode: RawRepresentable, Hashable, Sendable {
        public var rawValue: UInt16
        public init(rawValue: UInt16) { self.rawValue = rawValue }
        public static let contentTooLarge = ReplyCode(rawValue: 311)
        public static let noRoute = ReplyCode(rawValue: 312)
        public static let connectionForced = ReplyCode(rawValue: 320)
        public static let invalidPath = ReplyCode(rawValue: 402)
        public static let accessRefused = ReplyCode(rawValue: 403)
        public static let notFound = ReplyCode(rawValue: 404)
        public static let resourceLocked = ReplyCode(rawValue: 405)
        public static let preconditionFailed = ReplyCode(rawValue: 406)
        public static let frameError = ReplyCode(rawValue: 501)
        public static let syntaxError = ReplyCode(rawValue: 502)
        public static let commandInvalid = ReplyCode(rawValue: 503)
        public static let channelError = ReplyCode(rawValue: 504)
        public static let unexpectedFrame = ReplyCode(rawValue: 505)
        public static let resourceError = ReplyCode(rawValue: 506)
        public static let notAllowed = ReplyCode(rawValue: 530)
        public static let notImplemented = ReplyCode(rawValue: 540)
        public static let internalError = ReplyCode(rawValue: 541)
    }

    /// What kind of failure this is.
    public var code: Code
    /// A sentence naming what was wrong.
    public var message: String
    /// The broker's reply code, when the broker closed a channel or the connection.
    public var replyCode: ReplyCode?
    /// The broker's reply text, e.g. `NOT_FOUND - no exchange 'x' in vhost '/'`.
    public var replyText: String?
    /// The AMQP method the broker named as the cause (`queue.declare`, `basic.publish`), if any.
    public var method: String?
    /// rabbitmq-c's status code, for library-level failures.
    public var libraryStatus: Int32?
    /// True when the operation may or may not have taken effect: a publish whose confirm was lost
    /// with its channel or connection. Republish it (with the same `message_id`) to be safe.
    public var isOutcomeUnknown: Bool

    public init(
        code: Code, message: String, replyCode: ReplyCode? = nil, replyText: String? = nil,
        method: String? = nil, libraryStatus: Int32? = nil, isOutcomeUnknown: Bool = false
    ) {
        self.code = code
        self.message = message
        self.replyCode = replyCode
        self.replyText = replyText
        self.method = method
        self.libraryStatus = libraryStatus
        self.isOutcomeUnknown = isOutcomeUnknown
    }

    /// True for failures that a later attempt may not hit: a lost or reconnecting connection,
    /// a timeout, a channel closed under an operation whose outcome is unknown.
    public var isTransient: Bool {
        switch self.code {
        case .connectionLost, .connectionClosedByServer, .notConnected, .timeout: return true
        default: return self.isOutcomeUnknown
        }
    }

    public var description: String {
        var text = "AMQPError.\(self.code): \(self.message)"
        if let replyCode = self.replyCode {
            text += " (reply \(replyCode.rawValue)"
            if let replyText = self.replyText { text += " \(replyText)" }
            if let method = self.method { text += ", caused by \(method)" }
            text += ")"
        }
        if self.isOutcomeUnknown { text += " [outcome unknown]" }
        return text
    }

    /// The same error, marked as one whose outcome is unknown (used for pending confirms).
    func outcomeUnknown() -> AMQPError {
        var copy = self
        copy.isOutcomeUnknown = true
        return copy
    }
}

extension AMQPError {
    static func invalidArgument(_ message: String) -> AMQPError {
        AMQPError(code: .invalidArgument, message: message)
    }
    static func connectionClosed() -> AMQPError {
        AMQPError(code: .connectionClosed, message: "the connection was closed by the application")
    }
    static func notConnected() -> AMQPError {
        AMQPError(code: .notConnected, message: "the connection to the broker is down and being re-established")
    }
}

extension AMQPError {
    /// A queue that exists but cannot be reached now — RabbitMQ's 404 for an "absent" queue:
    /// its node is down ("home node … is down or inaccessible"), its process stopped (a node
    /// shutting down: "process is stopped by supervisor"), crashed ("has crashed and failed to
    /// restart") or slow ("… due to timeout"), or a quorum queue's leader moving ("may be
    /// stopping or being demoted"). Unlike a plain 404 ("no queue"), it is not gone.
    public var isQueueUnavailable: Bool {
        guard self.replyCode == .notFound else { return false }
        let text = self.replyText ?? self.message
        return Self.absentQueueTexts.contains { text.contains($0) }
    }

    static let absentQueueTexts = ["is down or inaccessible", "process is stopped by supervisor", "has crashed and failed to restart",
                                   "failed to perform operation on", "may be stopping or being demoted", "timed out while declaring"]
}
