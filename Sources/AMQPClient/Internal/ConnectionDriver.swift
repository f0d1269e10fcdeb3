internal import CAQRabbitMQ
import Foundation
import Logging

#if canImport(Glibc)
import Glibc
#endif

/// The owner of one rabbitmq-c connection. It lives on, and is only touched by, its own thread.
///
/// rabbitmq-c is not thread-safe and only services heartbeats inside library calls, so the thread
/// runs its own frame loop: run the queued jobs, read every frame that is available without
/// blocking, dispatch it (deliveries, confirms, returns, cancels, closes), then sleep in `poll` on
/// the socket and the mailbox's wake-up pipe for at most a quarter of the heartbeat interval.
final class ConnectionDriver {
    enum Phase {
        case connected
        case reconnecting(attempt: Int, next: ContinuousClock.Instant)
        case closed
    }

    let configuration: AMQPConfiguration
    let shared: ConnectionShared
    var logger: Logger { self.shared.logger }

    var conn: amqp_connection_state_t?
    var sockfd: Int32 = -1
    var phase: Phase = .closed
    var channels: [UInt16: ChannelState] = [:]
    var topology = TopologyRecorder()
    var blocked = false
    /// Publishes held while the broker blocks the connection.
    var held: [() -> Void] = []
    /// Channel reserved for the client's own work (topology recovery); `channel_max`.
    var scratchChannel: UInt16 = 2047
    var nextConsumerTag = 0
    private var jobBuffer: [ConnectionJob] = []
    private var didRunJobs = false
    /// Consumers with deliveries read in this turn, handed over at the end of the turn: one
    /// wake-up of a waiting consumer per burst of frames instead of one per message.
    var readyConsumers: [ConsumerState] = []
    private var pollBuffer: [pollfd] = []
    /// Whether the last poll saw the AMQP socket readable (or we could not tell).
    private var socketReadable = true
    private var lastRead = ContinuousClock.now
    private var extensionRanges: [Range<Int>] = []
    /// Channels with acks queued in this turn.
    var channelsWithPendingAcks: [UInt16] = []
    /// Channels holding acks back (see `ChannelState.heldAcks`).
    var channelsHoldingAcks: [UInt16] = []
    /// Reused for every publish, so building properties costs no malloc.
    let publishArena = CArena(capacity: 16 * 1024)
    /// A publish's frames, encoded for one `send()` (see `sendPublish`): `publishBufferSize`,
    /// grown for a larger message up to `maxPublishBuffer` (larger messages go through
    /// `amqp_basic_publish`), and given back after a message that needed more than
    /// `keptPublishBuffer`, so one large message does not pin megabytes per connection.
    var publishBuffer: UnsafeMutableRawBufferPointer = .allocate(byteCount: ConnectionDriver.publishBufferSize, alignment: 8)
    static let publishBufferSize = 128 * 1024
    static let keptPublishBuffer = 1024 * 1024
    static let maxPublishBuffer = 4 * 1024 * 1024
    /// The connection is plain TCP (not TLS): its frames may be written to the socket directly.
    var plainSocket = false
    private var closeWaiters: [CheckedContinuation<Void, Never>] = []
    /// Messages whose content frames are still arriving, per channel.
    var incoming: [UInt16: IncomingContent] = [:]
    /// The content of the pending `basic.get`, once complete.
    var completedGet: IncomingContent?
    /// When bytes last arrived from the broker (a frame, or the socket seen readable).
    var lastReceive = ContinuousClock.now
    /// The negotiated heartbeat, in seconds (0: none).
    var heartbeatSeconds = 0
    /// Lets the watchdog free this thread if rabbitmq-c ever blocks it in a system call.
    let watch: StuckThreadWatchdog.Entry
    /// Thread-hosted extensions (see ``AMQPConnectionExtension``).
    var extensions: [any AMQPConnectionExtension] = []
    lazy var context = AMQPThreadContext(driver: self)

    init(configuration: AMQPConfiguration, shared: ConnectionShared) {
        self.configuration = configuration
        self.shared = shared
        self.watch = StuckThreadWatchdog.Entry(connection: shared.id, logger: shared.logger)
    }

    deinit { self.publishBuffer.deallocate() }

    var isConnected: Bool {
        if case .connected = self.phase { return true }
        return false
    }

    // MARK: - Thread entry

    /// Starts the thread, connects, and returns once the first login succeeded or failed.
    static func start(configuration: AMQPConfiguration, shared: ConnectionShared) async throws {
        try await withCheckedThrowingContinuation { (startup: CheckedContinuation<Void, any Error>) in
            let thread = Thread {
                // Named for ps/top/perf (Foundation's `name` does not reach the kernel on Linux).
                aq_set_thread_name("aq-amqp-\(shared.id)")
                let driver = ConnectionDriver(configuration: configuration, shared: shared)
                // Each address once, in order, until one lets us in.
                var failures: [AMQPError] = []
                for _ in configuration.endpoints.indices {
                    do throws(AMQPError) {
                        try driver.openConnection()
                        try driver.restoreAfterConnect()
                        failures.removeAll()
                        break
                    } catch {
                        driver.destroyConnection()
                        failures.append(error)
                        driver.endpointIndex += 1
                    }
                }
                driver.releaseRetiredConnections()
                if let last = failures.last {
                    _ = shared.mailbox.close()
                    shared.emit(.closed)
                    startup.resume(throwing: failures.count == 1 ? last
                        : AMQPError(code: last.code, message: "could not connect to any of \(failures.count) brokers: \(failures.map(\.message).joined(separator: "; "))",
                                    libraryStatus: last.libraryStatus))
                    return
                }
                driver.phase = .connected
                shared.emit(.connected)
                startup.resume()
                driver.runLoop()
            }
            thread.name = "aq-amqp-\(shared.id)"
            // rabbitmq-c decodes header tables recursively, one C frame pair per nesting level,
            // before the client can look at them: a hostile header nested as deep as a frame
            // allows (over 20,000 levels in 128 KiB) needs a few MiB. Untouched stack costs nothing.
            thread.stackSize = Self.stackSize(frameMax: configuration.frameMax)
            thread.start()
        }
    }

    private func runLoop() {
        StuckThreadWatchdog.shared.register(self.watch)
        defer { StuckThreadWatchdog.shared.unregister(self.watch) }
        defer { self.releaseRetiredConnections() }
        while true {
            if !self.retiredConnections.isEmpty { self.releaseRetiredConnections() }
            self.watch.turnStarted()
            self.runJobs()
            switch self.phase {
            case .connected: self.serviceConnection()
            case .reconnecting:
                if self.runExtensions() { continue }
                self.reconnectStep()
            case .closed:
                self.finish()
                return
            }
        }
    }

    private func runJobs() {
        self.didRunJobs = false
        guard self.shared.mailbox.mayHaveJobs else { return }
        self.shared.mailbox.take(into: &self.jobBuffer)
        guard !self.jobBuffer.isEmpty else { return }
        self.didRunJobs = true
        // Several jobs (publishes from many requests, acks) write several frames each: corked,
        // the kernel sends them as full segments when the turn ends instead of one segment (and
        // one wake-up of the broker) per frame. One job gains nothing: rabbitmq-c already sends
        // a publish's method and header frames with MSG_MORE.
        let cork = self.jobBuffer.count > 1 && self.sockfd >= 0
        if cork { self.setCork(true) }
        self.corked = cork
        // Jobs queued by the jobs themselves run in the same turn, a few rounds at most: a task
        // on the connection's executor acks what it took (one job per ack) right after it ran,
        // and those acks then leave with this turn's instead of waiting for the next turn.
        for round in 0..<Self.jobRoundsPerTurn {
            if round > 0 {
                guard self.shared.mailbox.mayHaveJobs else { break }
                self.shared.mailbox.take(into: &self.jobBuffer)
            }
            for job in self.jobBuffer {
                self.watch.turnStarted()  // each job is held to the stall limit on its own
                job(self)
            }
            self.jobBuffer.removeAll(keepingCapacity: true)
        }
        self.flushAcks()
        self.uncork()
    }

    /// How many times one turn takes the jobs queued (see `runJobs`).
    static let jobRoundsPerTurn = 3

    /// Whether the socket is corked now (this turn's jobs; see `runJobs`).
    private var corked = false

    /// Sends what the cork holds: at the end of a turn, and before a job that waits for an answer.
    func uncork() {
        guard self.corked else { return }
        self.corked = false
        self.setCork(false)
    }

    private func setCork(_ on: Bool) {
        var value: Int32 = on ? 1 : 0
        _ = setsockopt(self.sockfd, Int32(IPPROTO_TCP), TCP_CORK, &value, socklen_t(MemoryLayout<Int32>.size))
    }

    private var pollTimeoutMilliseconds: Int32 {
        let heartbeat = self.conn.map { Int(amqp_get_heartbeat($0)) } ?? self.configuration.heartbeat
        return heartbeat > 0 ? Int32(min(250, heartbeat * 1000 / 4)) : 250
    }

    /// When the last poll returned.
    private var lastPoll = ContinuousClock.now

    /// Reads what the socket has, dispatches it, and sleeps when there is nothing to do.
    private func serviceConnection() {
        guard let conn = self.conn else { return }
        var frames = 0
        // Skip the read (a recv that would say EAGAIN) when poll saw nothing on the socket and
        // rabbitmq-c holds nothing; still enter the library often enough for heartbeats.
        let now = ContinuousClock.now
        let mustRead = self.socketReadable || amqp_frames_enqueued(conn) != 0 || amqp_data_in_buffer(conn) != 0
            || now - self.lastRead > .milliseconds(50)
        if mustRead {
            self.lastRead = now
            self.socketReadable = false
        }
        var bodyBytes = 0
        if mustRead { (frames, bodyBytes) = self.readAvailable(conn) }
        self.handOverDeliveries()
        self.flushAcks()  // acks that thread-hosted handlers queued while the frames were read
        if frames > 0 { self.recycleNackingChannels() }
        guard self.isConnected else { return }
        let busy = self.runExtensions()
        guard self.isConnected else { return }
        // Held-back acks whose time is up go now (see `ChannelState.heldAcks`); the sleep below
        // ends when the next ones are due.
        let heldDue = self.releaseHeldAcks(now: now)
        amqp_maybe_release_buffers(conn)
        if busy || frames >= 1024 || bodyBytes >= Self.maxBodyBytesPerTurn || amqp_frames_enqueued(conn) != 0 || amqp_data_in_buffer(conn) != 0 {
            // More to do at once: no sleep. The extensions' descriptors are still polled (without
            // waiting) once a millisecond, or a thread kept busy by the broker would never tell
            // libcurl its sockets are writable and uploads would crawl on its timer alone; not
            // every turn, which costs a system call per turn on the busiest path.
            if now - self.lastPoll >= .milliseconds(1) { self.wait(socket: self.sockfd, milliseconds: 0) }
            self.socketReadable = true
            return
        }
        var timeout = min(self.pollTimeoutMilliseconds, 50)
        if let due = heldDue { timeout = min(timeout, max(1, Self.milliseconds(until: due))) }
        self.wait(socket: self.sockfd, milliseconds: timeout)
    }

    /// Whole milliseconds from now until `deadline`, rounded up (0 when it has passed).
    static func milliseconds(until deadline: ContinuousClock.Instant) -> Int32 {
        let left = deadline - ContinuousClock.now
        guard left > .zero else { return 0 }
        return Int32(clamping: left.components.seconds * 1000 + (left.components.attoseconds + 999_999_999_999_999) / 1_000_000_000_000_000)
    }

    /// One turn of every extension, then the acks they queued.
    private func runExtensions() -> Bool {
        guard !self.extensions.isEmpty else { return false }
        var busy = false
        for item in self.extensions where item.runTurn() { busy = true }
        self.flushAcks()
        return busy
    }

    /// Sleeps in poll on the AMQP socket (if any), the wake-up pipe and the extensions' descriptors.
    private func wait(socket: Int32?, milliseconds: Int32) {
        guard self.shared.mailbox.beginSleep() else {
            self.socketReadable = true  // no poll this turn: we cannot tell, so read
            return
        }
        self.pollBuffer.removeAll(keepingCapacity: true)
        self.pollBuffer.append(pollfd(fd: self.shared.mailbox.wakeReadFD, events: Int16(POLLIN), revents: 0))
        if let socket { self.pollBuffer.append(pollfd(fd: socket, events: Int16(POLLIN), revents: 0)) }
        var timeout = milliseconds
        self.extensionRanges.removeAll(keepingCapacity: true)
        for item in self.extensions {
            let start = self.pollBuffer.count
            if let limit = item.pollRequests(into: &self.pollBuffer) { timeout = min(timeout, limit) }
            self.extensionRanges.append(start..<self.pollBuffer.count)
        }
        self.watch.sleeping()
        _ = poll(&self.pollBuffer, nfds_t(self.pollBuffer.count), max(0, timeout))
        self.watch.turnStarted()
        self.lastPoll = .now
        if socket != nil, self.pollBuffer[1].revents != 0 {
            self.socketReadable = true
            self.lastReceive = .now
        }
        self.shared.mailbox.endSleep(woken: self.pollBuffer[0].revents != 0)
        for (item, range) in zip(self.extensions, self.extensionRanges) where !range.isEmpty {
            item.handle(self.pollBuffer[range])
        }
    }

    /// Body bytes read in one turn of the loop before the turn ends and the pools are recycled.
    static let maxBodyBytesPerTurn = 4 << 20

    /// True when no byte may have arrived for a heartbeat interval: rabbitmq-c's receive deadline
    /// (two intervals) is then close enough that a publish could enter its hanging read (#780).
    var receiveIsStale: Bool {
        self.heartbeatSeconds > 0 && ContinuousClock.now - self.lastReceive > .seconds(self.heartbeatSeconds)
    }

    /// Reads and dispatches what the socket holds, without waiting. A peer silent past the
    /// heartbeat deadline is found out here (rabbitmq-c reports a heartbeat timeout).
    func readNow(_ conn: amqp_connection_state_t) {
        // rabbitmq-c swallows heartbeat frames; ask the socket whether anything arrived at all.
        var probe = pollfd(fd: self.sockfd, events: Int16(POLLIN), revents: 0)
        if poll(&probe, 1, 0) > 0, probe.revents & Int16(POLLIN) != 0 { self.noteReceived() }
        _ = self.readAvailable(conn)
    }

    /// Reads and dispatches every frame available without waiting, bounded in frames and in body
    /// bytes (rabbitmq-c keeps a turn's frames in its pools until the turn ends, so big messages
    /// must not pile up there). Returns what it read; a read error loses the connection.
    func readAvailable(_ conn: amqp_connection_state_t) -> (frames: Int, bodyBytes: Int) {
        var frames = 0, bodyBytes = 0, released = 0
        while self.isConnected && frames < 1024 && bodyBytes < Self.maxBodyBytesPerTurn {
            // Past the first frame, read only what rabbitmq-c already holds: asking for more would
            // end every turn with a recv() that says EAGAIN (the next poll tells when more came).
            if frames > 0, amqp_frames_enqueued(conn) == 0, amqp_data_in_buffer(conn) == 0 { break }
            var frame = amqp_frame_t()
            var zero = timeval(tv_sec: 0, tv_usec: 0)
            let status = amqp_simple_wait_frame_noblock(conn, &frame, &zero)
            if status == AMQP_STATUS_TIMEOUT.rawValue { break }
            guard status == AMQP_STATUS_OK.rawValue else {
                self.connectionLost(Self.libraryError(status, doing: "reading from the broker"))
                break
            }
            frames += 1
            // Before dispatching: a publish a handler makes must not think the peer silent.
            if frames == 1 { self.noteReceived() }
            if Int32(frame.frame_type) == AMQP_FRAME_BODY { bodyBytes += frame.payload.body_fragment.len }
            self.dispatch(frame, conn: conn)
            // rabbitmq-c recycles its pools only between frames: right after one was returned and
            // copied. At the end of a turn the next frame is often half read (a burst of large
            // messages keeps the socket full), so waiting for the turn's end let the pools hold
            // a whole burst (200 MB for 200 tasks of 1 MiB).
            if bodyBytes - released >= 1 << 20, self.isConnected {
                amqp_maybe_release_buffers(conn)
                released = bodyBytes
            }
        }
        return (frames, bodyBytes)
    }

    func noteReceived() { self.lastReceive = .now }

    func handOverDeliveries() {
        guard !self.readyConsumers.isEmpty else { return }
        for consumer in self.readyConsumers {
            if let buffer = consumer.buffer { buffer.append(&consumer.ready) } else { consumer.ready.removeAll(keepingCapacity: true) }
        }
        self.readyConsumers.removeAll(keepingCapacity: true)
    }

    /// Sleeps while disconnected (wake-up pipe and extensions only), for at most `milliseconds`.
    private func idle(milliseconds: Int32) {
        self.wait(socket: nil, milliseconds: max(1, milliseconds))
    }

    // MARK: - Connecting

    func openConnection() throws(AMQPError) {
        let config = self.configuration
        guard let conn = amqp_new_connection() else {
            throw AMQPError(code: .connectionFailed, message: "rabbitmq-c could not allocate a connection")
        }
        self.conn = conn
        let target = self.endpoint
        let endpoint = target.description
        let socket: OpaquePointer?
        if let tls = config.tls {
            socket = amqp_ssl_socket_new(conn)
            guard let socket else { throw AMQPError(code: .tlsFailed, message: "could not create a TLS socket") }
            if let ca = tls.caFile {
                let status = amqp_ssl_socket_set_cacert(socket, ca)
                guard status == AMQP_STATUS_OK.rawValue else {
                    throw AMQPError(code: .tlsFailed, message: "could not load the CA file '\(ca)': \(Self.statusText(status))", libraryStatus: status)
                }
            }
            if let cert = tls.certificateFile {
                guard let key = tls.keyFile else {
                    throw AMQPError(code: .invalidArgument, message: "a TLS client certificate needs a key file (keyfile)")
                }
                let status = amqp_ssl_socket_set_key(socket, cert, key)
                guard status == AMQP_STATUS_OK.rawValue else {
                    throw AMQPError(code: .tlsFailed, message: "could not load the client certificate '\(cert)' or key '\(key)': \(Self.statusText(status))", libraryStatus: status)
                }
            }
            amqp_ssl_socket_set_verify_peer(socket, tls.verifyPeer ? 1 : 0)
            amqp_ssl_socket_set_verify_hostname(socket, tls.verifyHostname ? 1 : 0)
            _ = amqp_ssl_socket_set_ssl_versions(socket, AMQP_TLSv1_2, AMQP_TLSvLATEST)
        } else {
            socket = amqp_tcp_socket_new(conn)
            guard socket != nil else { throw AMQPError(code: .connectionFailed, message: "could not create a TCP socket") }
        }
        self.plainSocket = config.tls == nil
        var timeout = Self.makeTimeval(config.connectTimeout)
        errno = 0
        let status = amqp_socket_open_noblock(socket, target.host, Int32(target.port), &timeout)
        guard status == AMQP_STATUS_OK.rawValue else {
            let osError = errno
            var why = Self.statusText(status)
            if status == AMQP_STATUS_SOCKET_ERROR.rawValue {
                // rabbitmq-c connects non-blocking and does not keep the socket's error; ask the
                // OS once more so the message says "Connection refused" or "No route to host".
                let probed = Self.probeConnectError(host: target.host, port: target.port, timeout: config.connectTimeout)
                if let probed { why = String(cString: strerror(probed)) } else if osError != 0, osError != EINPROGRESS {
                    why = String(cString: strerror(osError))
                }
            } else if status == AMQP_STATUS_HOSTNAME_RESOLUTION_FAILED.rawValue {
                why = "the host name '\(target.host)' could not be resolved"
            } else if status == AMQP_STATUS_TIMEOUT.rawValue {
                why = "no answer within \(config.connectTimeout)"
            }
            let code: AMQPError.Code = status <= AMQP_STATUS_SSL_ERROR.rawValue && status > AMQP_STATUS_SSL_ERROR.rawValue - 0x100 ? .tlsFailed : .connectionFailed
            throw AMQPError(code: code, message: "could not connect to \(endpoint): \(why)", libraryStatus: status)
        }
        self.sockfd = amqp_get_sockfd(conn)
        self.shared.status.withLock { $0.endpoint = target }
        var handshake = Self.makeTimeval(config.connectTimeout)
        _ = amqp_set_handshake_timeout(conn, &handshake)
        var rpc = Self.makeTimeval(config.rpcTimeout)
        _ = amqp_set_rpc_timeout(conn, &rpc)

        // Client properties: capabilities rabbitmq-c 0.11 does not send by itself.
        var properties: AMQPTable = [
            "product": "AsyncQueue AMQPClient",
            "platform": "Swift",
            "capabilities": .table([
                "consumer_cancel_notify": true,
                "connection.blocked": true,
                "publisher_confirms": true,
                "basic.nack": true,
                "exchange_exchange_bindings": true,
                "authentication_failure_close": true,
            ]),
        ]
        if let name = config.connectionName { properties["connection_name"] = .string(name) }
        let arena = CArena()
        var table = arena.table(properties)
        let reply = aq_amqp_login_plain(
            conn, config.virtualHost, Int32(config.channelMax), Int32(config.frameMax), Int32(config.heartbeat),
            &table, config.user, config.password)
        withExtendedLifetime(arena) {}
        if let error = Self.loginError(reply, configuration: config) { throw error }
        let channelMax = Int(amqp_get_channel_max(conn))
        self.scratchChannel = UInt16(clamping: channelMax > 0 ? channelMax : 2047)
        self.heartbeatSeconds = Int(amqp_get_heartbeat(conn))
        self.lastReceive = .now
        self.incoming.removeAll()
        self.completedGet = nil
        // A turn of this thread never lasts this long unless rabbitmq-c is stuck in a system call
        // on a peer that stopped reading or answering (its send and receive paths can wait
        // forever): the watchdog then shuts the socket down and the connection recovers.
        let heartbeat = Duration.seconds(self.heartbeatSeconds)
        self.watch.arm(fd: self.sockfd, limit: max(heartbeat * 2, config.rpcTimeout) + .seconds(5))
        self.logger.debug("amqp connected", metadata: ["amqp.connection.id": "\(self.shared.id)", "amqp.url": "\(config.redactedURL)"])
    }

    /// Maps a failed login to an error naming what was wrong.
    static func loginError(_ reply: amqp_rpc_reply_t, configuration config: AMQPConfiguration) -> AMQPError? {
        switch reply.reply_type {
        case AMQP_RESPONSE_NORMAL:
            return nil
        case AMQP_RESPONSE_SERVER_EXCEPTION:
            guard reply.reply.id == AMQP_CONNECTION_CLOSE_METHOD, let decoded = reply.reply.decoded else {
                return AMQPError(code: .protocolError, message: "login failed: unexpected reply from the broker")
            }
            let close = decoded.assumingMemoryBound(to: amqp_connection_close_t.self).pointee
            let text = CDecode.string(close.reply_text)
            let code = AMQPError.ReplyCode(rawValue: close.reply_code)
            switch code {
            case .accessRefused where text.contains("Login was refused") || text.contains("ACCESS_REFUSED - Login"):
                return AMQPError(code: .authenticationFailed, message: "the broker refused user '\(config.user)': wrong user name or password", replyCode: code, replyText: text)
            case .notAllowed where text.contains("vhost"):
                return AMQPError(code: .accessRefused, message: "virtual host '\(config.virtualHost)' does not exist or user '\(config.user)' may not use it", replyCode: code, replyText: text)
            case .accessRefused, .notAllowed:
                return AMQPError(code: .accessRefused, message: "the broker refused access to virtual host '\(config.virtualHost)' for user '\(config.user)'", replyCode: code, replyText: text)
            default:
                return AMQPError(code: .connectionClosedByServer, message: "the broker closed the connection during login", replyCode: code, replyText: text)
            }
        case AMQP_RESPONSE_LIBRARY_EXCEPTION:
            let status = reply.library_error
            if status == AMQP_STATUS_CONNECTION_CLOSED.rawValue || status == AMQP_STATUS_SOCKET_CLOSED.rawValue {
                return AMQPError(code: .authenticationFailed, message: "the broker closed the connection during login (wrong user name or password, or not an AMQP 0-9-1 port?)", libraryStatus: status)
            }
            if status == AMQP_STATUS_TIMEOUT.rawValue {
                return AMQPError(code: .timeout, message: "login did not finish within \(config.connectTimeout) (is \(config.host):\(config.port) an AMQP port?)", libraryStatus: status)
            }
            let code: AMQPError.Code = status <= AMQP_STATUS_SSL_ERROR.rawValue && status > AMQP_STATUS_SSL_ERROR.rawValue - 0x100 ? .tlsFailed : .connectionFailed
            return AMQPError(code: code, message: "login failed: \(Self.statusText(status))", libraryStatus: status)
        default:
            return AMQPError(code: .protocolError, message: "login failed without a reply")
        }
    }

    /// After a (re)connect: re-declare recorded topology, reopen channels, resume consumers.
    func restoreAfterConnect() throws(AMQPError) {
        guard let conn = self.conn else { throw .notConnected() }
        if !self.topology.exchanges.isEmpty || !self.topology.queues.isEmpty || !self.topology.bindings.isEmpty {
            try self.replayTopology(conn)
        }
        for id in self.channels.keys.sorted() {
            guard let channel = self.channels[id] else { continue }
            try self.reopen(channel)
        }
    }

    private func replayTopology(_ conn: amqp_connection_state_t) throws(AMQPError) {
        let scratch = self.scratchChannel
        func open() throws(AMQPError) {
            _ = amqp_channel_open(conn, scratch)
            try self.check(amqp_get_rpc_reply(conn), channel: scratch, doing: "opening a channel for topology recovery")
        }
        try open()
        let topology = self.topology
        for exchange in topology.exchanges {
            do throws(AMQPError) {
                try self.rawDeclareExchange(conn, scratch, exchange, passive: false)
            } catch where error.code == .channelClosedByServer {
                self.logger.warning("could not re-declare exchange after reconnect", metadata: ["exchange": "\(exchange.name)", "error": "\(error)"])
                try open()
            }
        }
        for queue in topology.queues {
            do throws(AMQPError) {
                _ = try self.rawDeclareQueue(conn, scratch, queue, passive: false)
            } catch where error.code == .channelClosedByServer {
                self.logger.warning("could not re-declare queue after reconnect", metadata: ["queue": "\(queue.name)", "error": "\(error)"])
                try open()
            }
        }
        for binding in topology.bindings {
            do throws(AMQPError) {
                try self.rawBind(conn, scratch, binding, unbind: false)
            } catch where error.code == .channelClosedByServer {
                self.logger.warning("could not re-declare binding after reconnect", metadata: ["source": "\(binding.source)", "destination": "\(binding.destination)", "error": "\(error)"])
                try open()
            }
        }
        _ = amqp_channel_close(conn, scratch, Int32(AMQP_REPLY_SUCCESS))
        try self.check(amqp_get_rpc_reply(conn), channel: scratch, doing: "closing the topology recovery channel")
    }

    /// How long a channel may answer every publish with a nack before it is reopened.
    static let nackStreakLimit: Duration = .seconds(3)

    /// Reopens the channels whose publishes have only been nacked for ``nackStreakLimit``: what
    /// is in flight on them fails as "outcome unknown" (publish it again), new publishes go to
    /// the fresh channel, which the broker routes to the quorum queue's current leader.
    private func recycleNackingChannels() {
        guard let conn = self.conn else { return }
        for channel in self.channels.values where channel.recycleRequested {
            channel.recycleRequested = false
            channel.nackedSince = nil
            guard channel.isOpen else { continue }
            self.logger.warning("amqp channel reopened: the broker nacked every publish on it for \(Self.nackStreakLimit) (RabbitMQ does so on a channel that met a quorum queue's leader election)",
                                metadata: ["amqp.channel.id": "\(channel.id)"])
            // Acks held back on it go first: the close would requeue those deliveries.
            self.flushAcks(channel, releaseHeld: true)
            guard self.isConnected else { return }
            _ = amqp_channel_close(conn, channel.id, Int32(AMQP_REPLY_SUCCESS))
            let reply = amqp_get_rpc_reply(conn)
            guard self.isConnected else { return }
            // The confirms (acks, nacks, returns) that came before close-ok wait in rabbitmq-c:
            // settled against this channel's tracker now, before the reopened channel's new
            // numbering could take them for its own.
            var zero = timeval(tv_sec: 0, tv_usec: 0)
            while self.isConnected, amqp_frames_enqueued(conn) != 0 {
                var frame = amqp_frame_t()
                guard amqp_simple_wait_frame_noblock(conn, &frame, &zero) == AMQP_STATUS_OK.rawValue else { break }
                self.dispatch(frame, conn: conn)
            }
            guard self.isConnected else { return }
            let error = AMQPError(code: .channelClosedByServer, message: "channel \(channel.id) was reopened after its publishes were nacked for \(Self.nackStreakLimit)")
            if reply.reply_type == AMQP_RESPONSE_NORMAL {
                self.channelClosed(channel.id, error, reopen: true, stash: false)
            } else {
                do throws(AMQPError) {
                    try self.check(reply, channel: channel.id, doing: "closing a channel to reopen it")
                } catch {
                    self.logger.warning("could not close the amqp channel to reopen it", metadata: ["amqp.channel.id": "\(channel.id)", "error": "\(error)"])
                }
            }
        }
    }

    /// Opens a channel again with its confirm mode, prefetch and consumers.
    func reopen(_ channel: ChannelState) throws(AMQPError) {
        guard let conn = self.conn else { throw .notConnected() }
        var attempts = 0
        while true {
            attempts += 1
            _ = amqp_channel_open(conn, channel.id)
            try self.check(amqp_get_rpc_reply(conn), channel: channel.id, doing: "opening channel \(channel.id)", reopenOnClose: false)
            channel.isOpen = true
            channel.epoch += 1
            channel.resetDeliveries()
            do throws(AMQPError) {
                if channel.confirmMode {
                    _ = amqp_confirm_select(conn, channel.id)
                    try self.check(amqp_get_rpc_reply(conn), channel: channel.id, doing: "confirm.select", reopenOnClose: false)
                }
                if channel.transactional {
                    // What the lost transaction held is gone: the next commit says so (unless the
                    // commit that met the close did already), and commits nothing.
                    channel.returnedInTransaction.removeAll()
                    if !channel.transactionLossReported, channel.transactionFailure == nil {
                        channel.transactionFailure = AMQPError(code: .channelClosedByServer,
                                                               message: "channel \(channel.id) was closed and reopened during the transaction: nothing of it was committed")
                    }
                    channel.transactionLossReported = false
                    _ = amqp_tx_select(conn, channel.id)
                    try self.check(amqp_get_rpc_reply(conn), channel: channel.id, doing: "tx.select", reopenOnClose: false)
                }
                if let prefetch = channel.prefetch {
                    _ = amqp_basic_qos(conn, channel.id, 0, prefetch.count, prefetch.global ? 1 : 0)
                    try self.check(amqp_get_rpc_reply(conn), channel: channel.id, doing: "basic.qos", reopenOnClose: false)
                }
                for consumer in channel.consumers.values.sorted(by: { $0.tag < $1.tag }) {
                    do throws(AMQPError) {
                        try self.rawConsume(conn, channel.id, consumer)
                    } catch where error.code == .channelClosedByServer {
                        // The queue is gone or locked: end this consumer, reopen for the others.
                        channel.consumers[consumer.tag] = nil
                        consumer.end(error)
                        throw error
                    }
                }
                return
            } catch where error.code == .channelClosedByServer && attempts <= channel.consumers.count + 2 {
                continue
            }
        }
    }

    // MARK: - Losing and regaining the connection

    func destroyConnection() {
        // Before rabbitmq-c closes the descriptor: the watchdog must never shut down a number
        // the system has handed out again.
        self.watch.disarm()
        // Freed at the top of the next turn, not here: a connection is often found broken in
        // the middle of an operation (an ack, a basic.get, a publish) whose callers up the stack
        // still hold the state and use it once more on their way out. Until then it is only a
        // dead socket (its descriptor stays ours, so the number is not handed out again).
        if let conn = self.conn { self.retiredConnections.append(conn) }
        self.conn = nil
        self.sockfd = -1
    }

    /// Frees the connection states ``destroyConnection()`` retired (no operation is running).
    func releaseRetiredConnections() {
        for conn in self.retiredConnections { amqp_destroy_connection(conn) }
        self.retiredConnections.removeAll()
    }

    /// The connection broke: fail what was in flight, then reconnect (or close for good).
    func connectionLost(_ error: AMQPError) {
        guard self.isConnected else { return }
        var error = error
        if let stuck = self.watch.firedAfter {
            error = AMQPError(code: .connectionLost,
                              message: "the broker stopped reading or answering: the connection thread was stuck in rabbitmq-c for \(stuck) and the socket was shut down (\(error.message))",
                              libraryStatus: error.libraryStatus)
        }
        self.incoming.removeAll()
        self.completedGet = nil
        self.handOverDeliveries()  // in order: what was read before the loss goes out first
        self.logger.warning("amqp connection lost", metadata: ["amqp.connection.id": "\(self.shared.id)", "error": "\(error)"])
        self.destroyConnection()
        self.failInFlight(error)
        self.shared.emit(.disconnected(error))
        // The node that went away is likely down: try the next address first.
        self.endpointIndex += 1
        if self.configuration.recovery.enabled {
            self.phase = .reconnecting(attempt: 1, next: .now + self.jittered(self.configuration.recovery.delay(forAttempt: 1)))
        } else {
            for channel in self.channels.values {
                for consumer in channel.consumers.values { consumer.end(error) }
                channel.consumers.removeAll()
            }
            self.phase = .closed
        }
    }

    private func failInFlight(_ error: AMQPError) {
        self.blocked = false
        let held = self.held
        self.held.removeAll()
        for publish in held { publish() }  // they see the connection is down and fail
        for channel in self.channels.values {
            channel.isOpen = false
            channel.epoch += 1
            var failed: [PublishCompletion] = []
            channel.tracker.reset { _, pending in failed.append(pending.completion) }
            for completion in failed { completion.complete(.failure(error.outcomeUnknown())) }
        }
    }

    /// Connection states that broke, freed at the top of the next turn (``destroyConnection()``).
    private var retiredConnections: [amqp_connection_state_t] = []

    /// Which of the configuration's addresses the next connect uses (it moves on after a
    /// failed attempt and after a loss).
    var endpointIndex = 0

    var endpoint: AMQPConfiguration.Endpoint {
        let all = self.configuration.endpoints
        return all[self.endpointIndex % all.count]
    }

    private func reconnectStep() {
        guard case .reconnecting(let attempt, let next) = self.phase else { return }
        let now = ContinuousClock.now
        if now < next {
            self.idle(milliseconds: Self.milliseconds(until: next))
            return
        }
        do {
            try self.openConnection()
            // Connected from here: restoring the consumers dispatches the deliveries that arrive
            // meanwhile, and their handlers must be able to settle them on the reopened channels.
            self.phase = .connected
            try self.restoreAfterConnect()
            self.flushAcks()
            self.logger.info("amqp connection recovered", metadata: ["amqp.connection.id": "\(self.shared.id)", "attempt": "\(attempt)", "broker": "\(self.endpoint)"])
            self.shared.emit(.connected)
        } catch {
            // connectionLost moves on to the next address itself.
            let wasConnected = self.isConnected
            if wasConnected { self.connectionLost(error) }
            self.destroyConnection()
            if !wasConnected { self.endpointIndex += 1 }
            // A round of every address without luck waits longer; within a round, the next
            // address is tried at the first delay.
            let round = attempt / self.configuration.endpoints.count + 1
            let delay = self.jittered(self.configuration.recovery.delay(forAttempt: self.configuration.endpoints.count > 1 ? round : attempt + 1))
            self.logger.info("amqp reconnect failed", metadata: ["amqp.connection.id": "\(self.shared.id)", "attempt": "\(attempt)", "error": "\(error)", "retry_in": "\(delay)"])
            self.phase = .reconnecting(attempt: attempt + 1, next: .now + delay)
        }
    }

    private func jittered(_ delay: Duration) -> Duration {
        delay * Double.random(in: 0.8...1.2)
    }

    // MARK: - Closing

    func close(waiter: CheckedContinuation<Void, Never>?) {
        if let waiter { self.closeWaiters.append(waiter) }
        if case .closed = self.phase { return }
        self.handOverDeliveries()
        self.flushAcks()
        self.releaseHeldAcks(all: true)
        if let conn = self.conn, self.isConnected {
            var short = timeval(tv_sec: 2, tv_usec: 0)
            _ = amqp_set_rpc_timeout(conn, &short)
            _ = amqp_connection_close(conn, Int32(AMQP_REPLY_SUCCESS))
        }
        self.destroyConnection()
        self.failInFlight(.connectionClosed())
        for channel in self.channels.values {
            for consumer in channel.consumers.values { consumer.end(nil) }
            channel.consumers.removeAll()
        }
        self.phase = .closed
    }

    /// Last act of the thread: refuse new jobs, fail queued ones, tell everybody.
    private func finish() {
        self.destroyConnection()
        let error = self.shared.status.withLock { $0.lastError }
        for channel in self.channels.values {
            for consumer in channel.consumers.values { consumer.end(error) }
        }
        self.channels.removeAll()
        for job in self.shared.mailbox.close() { job(self) }
        for item in self.extensions { item.connectionClosed() }
        self.extensions.removeAll()
        self.shared.emit(.closed)
        for waiter in self.closeWaiters { waiter.resume() }
        self.closeWaiters.removeAll()
    }

    // MARK: - Helpers

    /// The connection thread's stack: room for rabbitmq-c's recursive decoding of the deepest
    /// header a frame can carry (about 5 bytes and 150 bytes of C stack per level), at least 16 MiB.
    static func stackSize(frameMax: Int) -> Int {
        max(16 << 20, min(frameMax, 1 << 20) * 64)
    }

    static func makeTimeval(_ duration: Duration) -> timeval {
        let (seconds, attoseconds) = duration.components
        return Glibc.timeval(tv_sec: Int(seconds), tv_usec: Int(attoseconds / 1_000_000_000_000))
    }

    /// Connects a plain blocking socket once to learn why connecting failed (errno), or nil.
    static func probeConnectError(host: String, port: Int, timeout: Duration) -> Int32? {
        var hints = addrinfo()
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        var result: UnsafeMutablePointer<addrinfo>?
        guard getaddrinfo(host, String(port), &hints, &result) == 0, let info = result else { return nil }
        defer { freeaddrinfo(result) }
        let fd = socket(info.pointee.ai_family, info.pointee.ai_socktype, info.pointee.ai_protocol)
        guard fd >= 0 else { return nil }
        defer { Glibc.close(fd) }
        var tv = Self.makeTimeval(min(timeout, .seconds(5)))
        _ = setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<Glibc.timeval>.size))
        if connect(fd, info.pointee.ai_addr, info.pointee.ai_addrlen) == 0 { return nil }
        return errno
    }

    static func statusText(_ status: Int32) -> String {
        guard let text = amqp_error_string2(status) else { return "status \(status)" }
        return String(cString: text)
    }

    static func libraryError(_ status: Int32, doing: String) -> AMQPError {
        AMQPError(code: .connectionLost, message: "\(doing) failed: \(Self.statusText(status))", libraryStatus: status)
    }
}
