internal import CAQRabbitMQ
#if canImport(Glibc)
import Glibc
#endif

/// The operations the public handles submit. All run on the connection thread.
extension ConnectionDriver {
    func requireConnection() throws(AMQPError) -> amqp_connection_state_t {
        switch self.phase {
        case .connected:
            guard let conn = self.conn else { throw .notConnected() }
            return conn
        case .reconnecting: throw .notConnected()
        case .closed: throw self.shared.closedError()
        }
    }

    /// The channel, open, after throwing any error the broker reported on it asynchronously.
    func requireChannel(_ id: UInt16) throws(AMQPError) -> (amqp_connection_state_t, ChannelState) {
        let conn = try self.requireConnection()
        guard let channel = self.channels[id] else {
            throw AMQPError.invalidArgument("channel \(id) was closed by the application")
        }
        if let error = channel.pendingError {
            channel.pendingError = nil
            throw error
        }
        if !channel.isOpen { try self.reopen(channel) }
        return (conn, channel)
    }

    // MARK: Channels

    func openChannel() throws(AMQPError) -> UInt16 {
        let conn = try self.requireConnection()
        var id: UInt16 = 1
        while self.channels[id] != nil { id += 1 }
        guard id < self.scratchChannel else {
            throw AMQPError.invalidArgument("no free channel: \(self.channels.count) are open (channel_max \(self.scratchChannel))")
        }
        _ = amqp_channel_open(conn, id)
        try self.check(amqp_get_rpc_reply(conn), channel: id, doing: "opening channel \(id)", reopenOnClose: false)
        let channel = ChannelState(id: id)
        channel.isOpen = true
        self.channels[id] = channel
        return id
    }

    func closeChannel(_ id: UInt16) throws(AMQPError) {
        if let channel = self.channels[id] { self.flushAcks(channel, releaseHeld: true) }
        guard let channel = self.channels.removeValue(forKey: id) else { return }
        var failed: [PublishCompletion] = []
        channel.tracker.reset { _, pending in failed.append(pending.completion) }
        for completion in failed {
            completion.complete(.failure(AMQPError(code: .connectionClosed, message: "the channel was closed before the broker confirmed the publish",
                                                   isOutcomeUnknown: true)))
        }
        for consumer in channel.consumers.values { consumer.end(nil) }
        guard channel.isOpen, self.isConnected, let conn = self.conn else { return }
        _ = amqp_channel_close(conn, id, Int32(AMQP_REPLY_SUCCESS))
        try self.check(amqp_get_rpc_reply(conn), channel: id, doing: "closing channel \(id)", reopenOnClose: false)
    }

    func enableConfirms(_ id: UInt16) throws(AMQPError) {
        let (conn, channel) = try self.requireChannel(id)
        guard !channel.confirmMode else { return }
        guard !channel.transactional else { throw .invalidArgument("channel \(id) is in transaction mode: AMQP allows no confirms on it") }
        _ = amqp_confirm_select(conn, id)
        try self.check(amqp_get_rpc_reply(conn), channel: id, doing: "confirm.select")
        channel.confirmMode = true
    }

    func selectTransactions(_ id: UInt16) throws(AMQPError) {
        let (conn, channel) = try self.requireChannel(id)
        guard !channel.transactional else { return }
        // Acks held back before go now, outside the transaction (a rolled-back one would lose them).
        self.flushAcks(channel, releaseHeld: true)
        guard !channel.confirmMode else { throw .invalidArgument("channel \(id) is in confirm mode: AMQP allows no transactions on it") }
        var select = amqp_tx_select_t(dummy: 0)
        try self.rpcDispatching(conn, id, AMQP_TX_SELECT_METHOD, &select, reply: AMQP_TX_SELECT_OK_METHOD, doing: "tx.select")
        channel.transactional = true
        channel.transactionFailure = nil
    }

    func commit(_ id: UInt16) throws(AMQPError) -> [AMQPReturnedMessage] {
        // A transaction that lost part of itself commits nothing: the broker closed the channel
        // (what it held is gone; the error waits in `pendingError`, and later publishes and acks
        // went to a new transaction on the reopened channel), or a publish never reached the
        // broker. What the channel holds now is rolled back and the error thrown.
        if let channel = self.channels[id], channel.transactional {
            if let lost = channel.pendingError ?? channel.transactionFailure {
                channel.pendingError = nil
                channel.pendingAcks.removeAll()
                channel.transactionFailure = nil
                channel.returnedInTransaction.removeAll()
                let (conn, _) = try self.requireChannel(id)
                var rollback = amqp_tx_rollback_t(dummy: 0)
                try self.rpcDispatching(conn, id, AMQP_TX_ROLLBACK_METHOD, &rollback, reply: AMQP_TX_ROLLBACK_OK_METHOD, doing: "tx.rollback")
                throw lost
            }
        }
        let (conn, channel) = try self.requireChannel(id)
        guard channel.transactional else { throw .invalidArgument("channel \(id) is not in transaction mode") }
        // The acks the transaction holds go first: they are coalesced until a turn ends.
        self.flushAcks(channel, releaseHeld: true)
        var commit = amqp_tx_commit_t(dummy: 0)
        // Returns for the transaction's mandatory publishes arrive before commit-ok.
        do throws(AMQPError) {
            try self.rpcDispatching(conn, id, AMQP_TX_COMMIT_METHOD, &commit, reply: AMQP_TX_COMMIT_OK_METHOD, doing: "tx.commit")
        } catch {
            // Thrown here: the reopened channel's next transaction starts clean.
            channel.transactionLossReported = true
            channel.returnedInTransaction.removeAll()
            throw error
        }
        defer { channel.returnedInTransaction.removeAll() }
        return channel.returnedInTransaction
    }

    func setPrefetch(_ id: UInt16, count: UInt16, global: Bool) throws(AMQPError) {
        let (conn, channel) = try self.requireChannel(id)
        var qos = amqp_basic_qos_t(prefetch_size: 0, prefetch_count: count, global: global ? 1 : 0)
        // Waits for qos-ok while dispatching what arrives meanwhile (deliveries of running consumers).
        try self.rpcDispatching(conn, id, AMQP_BASIC_QOS_METHOD, &qos, reply: AMQP_BASIC_QOS_OK_METHOD, doing: "basic.qos")
        channel.prefetch = (count, global)
    }

    // MARK: Exchanges, queues, bindings

    func rawDeclareExchange(_ conn: amqp_connection_state_t, _ id: UInt16, _ e: TopologyRecorder.Exchange, passive: Bool) throws(AMQPError) {
        let arena = CArena()
        _ = amqp_exchange_declare(conn, id, arena.bytes(e.name), arena.bytes(e.type), passive ? 1 : 0, e.durable ? 1 : 0,
                                  e.autoDelete ? 1 : 0, e.isInternal ? 1 : 0, arena.table(e.arguments))
        withExtendedLifetime(arena) {}
        try self.check(amqp_get_rpc_reply(conn), channel: id, doing: "declaring exchange '\(e.name)'")
    }

    func declareExchange(_ id: UInt16, _ e: TopologyRecorder.Exchange, passive: Bool) throws(AMQPError) {
        let (conn, _) = try self.requireChannel(id)
        try self.rawDeclareExchange(conn, id, e, passive: passive)
        if !passive { self.topology.record(e) }
    }

    func deleteExchange(_ id: UInt16, name: String, ifUnused: Bool) throws(AMQPError) {
        let (conn, _) = try self.requireChannel(id)
        let arena = CArena()
        _ = amqp_exchange_delete(conn, id, arena.bytes(name), ifUnused ? 1 : 0)
        withExtendedLifetime(arena) {}
        try self.check(amqp_get_rpc_reply(conn), channel: id, doing: "deleting exchange '\(name)'")
        self.topology.forgetExchange(name)
    }

    func rawDeclareQueue(_ conn: amqp_connection_state_t, _ id: UInt16, _ q: TopologyRecorder.Queue, passive: Bool) throws(AMQPError) -> AMQPQueueInfo {
        let arena = CArena()
        let ok = amqp_queue_declare(conn, id, arena.bytes(q.name), passive ? 1 : 0, q.durable ? 1 : 0, q.exclusive ? 1 : 0,
                                    q.autoDelete ? 1 : 0, arena.table(q.arguments))
        withExtendedLifetime(arena) {}
        try self.check(amqp_get_rpc_reply(conn), channel: id, doing: "declaring queue '\(q.name)'")
        guard let ok else { throw AMQPError(code: .protocolError, message: "queue.declare-ok missing") }
        return AMQPQueueInfo(name: CDecode.string(ok.pointee.queue), messageCount: ok.pointee.message_count,
                             consumerCount: ok.pointee.consumer_count)
    }

    func declareQueue(_ id: UInt16, _ q: TopologyRecorder.Queue, passive: Bool) throws(AMQPError) -> AMQPQueueInfo {
        let (conn, _) = try self.requireChannel(id)
        let info = try self.rawDeclareQueue(conn, id, q, passive: passive)
        // Server-named queues get a new name on redeclare, so only named ones are replayed.
        if !passive && !q.name.isEmpty { self.topology.record(q) }
        return info
    }

    func deleteQueue(_ id: UInt16, name: String, ifUnused: Bool, ifEmpty: Bool) throws(AMQPError) -> UInt32 {
        let (conn, _) = try self.requireChannel(id)
        let arena = CArena()
        let ok = amqp_queue_delete(conn, id, arena.bytes(name), ifUnused ? 1 : 0, ifEmpty ? 1 : 0)
        withExtendedLifetime(arena) {}
        try self.check(amqp_get_rpc_reply(conn), channel: id, doing: "deleting queue '\(name)'")
        self.topology.forgetQueue(name)
        return ok?.pointee.message_count ?? 0
    }

    func purgeQueue(_ id: UInt16, name: String) throws(AMQPError) -> UInt32 {
        let (conn, _) = try self.requireChannel(id)
        let arena = CArena()
        let ok = amqp_queue_purge(conn, id, arena.bytes(name))
        withExtendedLifetime(arena) {}
        try self.check(amqp_get_rpc_reply(conn), channel: id, doing: "purging queue '\(name)'")
        return ok?.pointee.message_count ?? 0
    }

    func rawBind(_ conn: amqp_connection_state_t, _ id: UInt16, _ b: TopologyRecorder.Binding, unbind: Bool) throws(AMQPError) {
        let arena = CArena()
        let destination = arena.bytes(b.destination), source = arena.bytes(b.source), key = arena.bytes(b.routingKey)
        let arguments = arena.table(b.arguments)
        switch (b.toExchange, unbind) {
        case (false, false): _ = amqp_queue_bind(conn, id, destination, source, key, arguments)
        case (false, true): _ = amqp_queue_unbind(conn, id, destination, source, key, arguments)
        case (true, false): _ = amqp_exchange_bind(conn, id, destination, source, key, arguments)
        case (true, true): _ = amqp_exchange_unbind(conn, id, destination, source, key, arguments)
        }
        withExtendedLifetime(arena) {}
        let what = b.toExchange ? "exchange" : "queue"
        try self.check(amqp_get_rpc_reply(conn), channel: id,
                       doing: "\(unbind ? "unbinding" : "binding") \(what) '\(b.destination)' \(unbind ? "from" : "to") exchange '\(b.source)' with routing key '\(b.routingKey)'")
    }

    func bind(_ id: UInt16, _ b: TopologyRecorder.Binding, unbind: Bool) throws(AMQPError) {
        let (conn, _) = try self.requireChannel(id)
        try self.rawBind(conn, id, b, unbind: unbind)
        if unbind { self.topology.forget(b) } else { self.topology.record(b) }
    }

    // MARK: Publishing

    func publish(
        _ id: UInt16, exchange: String, routingKey: String, mandatory: Bool, properties: AMQPProperties,
        body: [UInt8], completion: PublishCompletion
    ) {
        let conn: amqp_connection_state_t
        let channel: ChannelState
        do throws(AMQPError) {
            (conn, channel) = try self.requireChannel(id)
        } catch {
            completion.complete(.failure(error))
            return
        }
        func failTransaction(_ error: AMQPError) {
            if channel.transactional, channel.transactionFailure == nil { channel.transactionFailure = error }
        }
        if self.blocked, channel.transactional {
            // Held, it would miss its transaction's commit (which the acks would not): refused.
            let error = AMQPError(code: .connectionClosedByServer, message: "the broker blocks publishers (resource alarm): a transaction cannot publish now")
            failTransaction(error)
            completion.complete(.failure(error))
            return
        }
        if self.blocked {
            // The broker stopped reading from this connection (resource alarm). Hold the publish
            // rather than block the thread in a socket write (rabbitmq-c issue #519).
            self.held.append { [self] in
                self.publish(id, exchange: exchange, routingKey: routingKey, mandatory: mandatory,
                             properties: properties, body: body, completion: completion)
            }
            return
        }
        // rabbitmq-c sends the method frame before it encodes the header frame, and truncates
        // length bytes it cannot fit: anything that would not fit AMQP must fail here, alone.
        if let problem = WireCheck.publish(exchange: exchange, routingKey: routingKey, properties: properties,
                                           frameMax: Int(amqp_get_frame_max(conn))) {
            let error = AMQPError.invalidArgument("cannot publish to exchange '\(exchange.prefix(64))': \(problem)")
            failTransaction(error)
            completion.complete(.failure(error))
            return
        }
        // rabbitmq-c 0.11 (#780): a publish made once no byte arrived for two heartbeats reads with
        // an infinite timeout and hangs on a frozen peer. Read first (zero timeout): a dead peer is
        // then found out here, as a heartbeat timeout.
        if self.receiveIsStale {
            self.readNow(conn)
            guard self.isConnected, channel.isOpen else {
                let error = channel.pendingError ?? self.shared.closedError()
                channel.pendingError = nil
                completion.complete(.failure(error.outcomeUnknown()))
                return
            }
        }
        let arena = self.publishArena
        var cProperties = arena.properties(properties)
        let status = body.withUnsafeBytes { raw -> Int32 in
            var method = amqp_basic_publish_t(ticket: 0, exchange: arena.bytes(exchange), routing_key: arena.bytes(routingKey),
                                              mandatory: mandatory ? 1 : 0, immediate: 0)
            if let status = self.sendPublish(conn, id, &method, &cProperties, raw) { return status }
            let bytes = amqp_bytes_t(len: raw.count, bytes: UnsafeMutableRawPointer(mutating: raw.baseAddress))
            return amqp_basic_publish(conn, id, method.exchange, method.routing_key, method.mandatory, 0, &cProperties, bytes)
        }
        arena.reset()
        guard status == AMQP_STATUS_OK.rawValue else {
            let error = Self.libraryError(status, doing: "publishing to exchange '\(exchange)'")
            self.connectionLost(error)
            completion.complete(.failure(error.outcomeUnknown()))
            return
        }
        if channel.confirmMode {
            channel.tracker.register(PendingPublish(
                completion: completion, messageId: properties.messageId, exchange: exchange, routingKey: routingKey,
                returned: nil))
        } else {
            completion.complete(.success(.sent))
        }
    }

    /// Writes a publish's frames with one `send()` on a plain TCP connection (rabbitmq-c's
    /// `amqp_basic_publish` makes one per frame: three system calls for a small message). The
    /// bytes are the ones rabbitmq-c would send, encoded by its own `amqp_encode_method` and
    /// `amqp_encode_properties`; frames are never interleaved, since only this thread writes.
    /// Returns nil when it did not send (TLS, or a message larger than the buffer's limit): the
    /// caller then uses `amqp_basic_publish`.
    func sendPublish(_ conn: amqp_connection_state_t, _ id: UInt16, _ method: inout amqp_basic_publish_t,
                     _ properties: inout amqp_basic_properties_t, _ body: UnsafeRawBufferPointer) -> Int32? {
        guard self.plainSocket else { return nil }
        let frameMax = Int(amqp_get_frame_max(conn))
        guard frameMax >= 4096 else { return nil }
        // The body adds 8 bytes a frame; 64 KiB is room for the method and the content header
        // with any usual headers. Rarer, larger headers do not fit: the encoder says so and the
        // message goes through `amqp_basic_publish`.
        let needed = 64 * 1024 + body.count + 8 * (body.count / (frameMax - 8) + 1)
        guard needed <= Self.maxPublishBuffer else { return nil }
        if self.publishBuffer.count < needed {
            // Doubling stays within the kept size unless this message needs more.
            let grown = needed <= Self.keptPublishBuffer ? min(max(needed, 2 * self.publishBuffer.count), Self.keptPublishBuffer) : needed
            self.publishBuffer.deallocate()
            self.publishBuffer = .allocate(byteCount: grown, alignment: 8)
        }
        defer {
            if needed > Self.keptPublishBuffer {
                self.publishBuffer.deallocate()
                self.publishBuffer = .allocate(byteCount: Self.publishBufferSize, alignment: 8)
            }
        }
        guard let base = self.publishBuffer.baseAddress?.assumingMemoryBound(to: UInt8.self) else { return nil }
        let length = aq_encode_publish(base, self.publishBuffer.count, id, &method, &properties,
                                       body.baseAddress?.assumingMemoryBound(to: UInt8.self), body.count, frameMax)
        guard length > 0 else { return nil }
        let fd = amqp_get_sockfd(conn)
        guard fd >= 0 else { return nil }
        var offset = 0
        while offset < length {
            let n = send(fd, base + offset, length - offset, Int32(MSG_NOSIGNAL))
            if n > 0 {
                offset += n
                continue
            }
            let error = errno
            if n < 0, error == EINTR { continue }
            if n < 0, error == EAGAIN || error == EWOULDBLOCK {
                // The socket is non-blocking: wait until it takes more. Nothing is read meanwhile
                // (a frame dispatched now could publish into the middle of this one); a broker
                // that never takes the rest is the stuck-thread watchdog's case: it shuts the
                // socket down after twice the heartbeat (or the RPC timeout) plus 5 s, this send
                // fails and the connection recovers. (rabbitmq-c waits until the heartbeat
                // deadline, reading meanwhile, and ends it as a heartbeat timeout.)
                var entry = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
                _ = poll(&entry, 1, -1)
                continue
            }
            return AMQP_STATUS_SOCKET_ERROR.rawValue
        }
        return AMQP_STATUS_OK.rawValue
    }

    // MARK: Consuming

    func rawConsume(_ conn: amqp_connection_state_t, _ id: UInt16, _ consumer: ConsumerState) throws(AMQPError) {
        let arena = CArena()
        var method = amqp_basic_consume_t(
            ticket: 0, queue: arena.bytes(consumer.queue), consumer_tag: arena.bytes(consumer.tag), no_local: 0,
            no_ack: consumer.noAck ? 1 : 0, exclusive: consumer.exclusive ? 1 : 0, nowait: 0, arguments: arena.table(consumer.arguments))
        defer { withExtendedLifetime(arena) {} }
        try self.rpcDispatching(conn, id, AMQP_BASIC_CONSUME_METHOD, &method, reply: AMQP_BASIC_CONSUME_OK_METHOD,
                                doing: "consuming from queue '\(consumer.queue)'")
    }

    /// Sends a method and waits for its reply on the channel, dispatching every other frame as
    /// the frame loop would. rabbitmq-c's own RPCs keep every frame that arrives meanwhile in its
    /// pools until they are read: while a consumer starts, the deliveries of the consumers
    /// started before it (a prefetch window of them) would pile up there.
    func rpcDispatching(_ conn: amqp_connection_state_t, _ id: UInt16, _ method: amqp_method_number_t,
                        _ decoded: UnsafeMutableRawPointer, reply: amqp_method_number_t, doing: String) throws(AMQPError) {
        let status = amqp_send_method(conn, id, method, decoded)
        guard status == AMQP_STATUS_OK.rawValue else {
            let error = Self.libraryError(status, doing: doing)
            self.connectionLost(error)
            throw error
        }
        let deadline = ContinuousClock.now + self.configuration.rpcTimeout
        while true {
            // Not `isConnected`: this also runs while a recovering connection restores its consumers.
            guard let conn = self.conn else { throw self.shared.closedError() }
            guard let frame = try self.nextFrame(conn, deadline: deadline, doing: doing, timeoutWording: "got no answer within") else { continue }
            if Int32(frame.frame_type) == AMQP_FRAME_METHOD, frame.channel == id {
                if frame.payload.method.id == reply { return }
                if frame.payload.method.id == AMQP_CHANNEL_CLOSE_METHOD, let closing = frame.payload.method.decoded {
                    let close = closing.assumingMemoryBound(to: amqp_channel_close_t.self).pointee
                    let error = Self.closeError(code: .channelClosedByServer, replyCode: close.reply_code, text: close.reply_text,
                                                classId: close.class_id, methodId: close.method_id, doing: doing)
                    self.sendChannelCloseOk(id)
                    self.channelClosed(id, error, reopen: false, stash: false)
                    throw error
                }
            }
            let body = Int32(frame.frame_type) == AMQP_FRAME_BODY
            self.dispatch(frame, conn: conn)
            if body, let conn = self.conn { amqp_maybe_release_buffers(conn) }
        }
    }

    func consume(_ id: UInt16, _ consumer: ConsumerState) throws(AMQPError) {
        let (conn, channel) = try self.requireChannel(id)
        guard channel.consumers[consumer.tag] == nil else {
            throw AMQPError.invalidArgument("consumer tag '\(consumer.tag)' is already in use on channel \(id)")
        }
        do throws(AMQPError) {
            try self.rawConsume(conn, id, consumer)
        } catch {
            if error.code == .channelClosedByServer, self.isConnected {
                do throws(AMQPError) { try self.reopen(channel) } catch {}
            }
            throw error
        }
        channel.consumers[consumer.tag] = consumer
    }

    func makeConsumerTag() -> String {
        self.nextConsumerTag += 1
        return "aq-\(self.shared.id)-\(self.nextConsumerTag)"
    }

    func cancelConsumer(_ id: UInt16, tag: String) throws(AMQPError) {
        guard let channel = self.channels[id], let consumer = channel.consumers.removeValue(forKey: tag) else { return }
        defer { consumer.end(nil) }
        guard channel.isOpen, self.isConnected, let conn = self.conn else { return }
        let arena = CArena()
        _ = amqp_basic_cancel(conn, id, arena.bytes(tag))
        withExtendedLifetime(arena) {}
        try self.check(amqp_get_rpc_reply(conn), channel: id, doing: "cancelling consumer '\(tag)'")
    }

    func get(_ id: UInt16, queue: String, noAck: Bool) throws(AMQPError) -> AMQPDelivery? {
        let (conn, channel) = try self.requireChannel(id)
        let arena = CArena()
        let reply = amqp_basic_get(conn, id, arena.bytes(queue), noAck ? 1 : 0)
        withExtendedLifetime(arena) {}
        try self.check(reply, channel: id, doing: "basic.get from queue '\(queue)'")
        guard reply.reply.id == AMQP_BASIC_GET_OK_METHOD, let decoded = reply.reply.decoded else { return nil }
        let ok = decoded.assumingMemoryBound(to: amqp_basic_get_ok_t.self).pointee
        let origin = IncomingContent.Origin.getOk(
            deliveryTag: ok.delivery_tag, redelivered: ok.redelivered != 0, exchange: CDecode.string(ok.exchange),
            routingKey: CDecode.string(ok.routing_key), messageCount: ok.message_count)
        if noAck { channel.markSettled(ok.delivery_tag) }
        // Frames that arrived before the get-ok were queued by the RPC; they come first on the
        // wire (a delivery's content on this channel among them), so dispatch them first.
        try self.dispatchQueuedFrames(conn, doing: "reading a basic.get message")
        self.incoming[id] = IncomingContent(origin: origin, maxBodyBytes: self.configuration.contentLimits.maxBodyBytes)
        self.completedGet = nil
        let content = try self.readUntilGetCompletes(doing: "reading a basic.get message")
        // The body is ours now: rabbitmq-c's frame pools go back (a caller looping over
        // basic.get within one turn would otherwise hold every message's frames).
        if let conn = self.conn { amqp_maybe_release_buffers(conn) }
        guard case .getOk(let tag, let redelivered, let exchange, let routingKey, let count) = content.origin else {
            throw AMQPError(code: .protocolError, message: "basic.get: unexpected content")
        }
        return AMQPDelivery(
            body: content.body, properties: content.properties ?? AMQPProperties(), exchange: exchange, routingKey: routingKey,
            deliveryTag: tag, isRedelivered: redelivered, consumerTag: nil, messageCount: count, contentProblem: content.problem,
            acker: noAck ? nil : DeliveryAcker(shared: self.shared, channel: id, epoch: channel.epoch))
    }

    /// Dispatches the frames rabbitmq-c queued while it waited for an RPC's reply.
    func dispatchQueuedFrames(_ conn: amqp_connection_state_t, doing: String) throws(AMQPError) {
        while self.isConnected, amqp_frames_enqueued(conn) != 0 {
            var frame = amqp_frame_t()
            var zero = timeval(tv_sec: 0, tv_usec: 0)
            let status = amqp_simple_wait_frame_noblock(conn, &frame, &zero)
            guard status == AMQP_STATUS_OK.rawValue else {
                if status == AMQP_STATUS_TIMEOUT.rawValue { return }
                let error = Self.libraryError(status, doing: doing)
                self.connectionLost(error)
                throw error
            }
            self.dispatch(frame, conn: conn)
        }
        guard self.isConnected else { throw self.shared.closedError() }
    }

    /// Reads and dispatches frames (any channel) until the pending basic.get's content is
    /// complete, for at most the RPC timeout.
    private func readUntilGetCompletes(doing: String) throws(AMQPError) -> IncomingContent {
        let deadline = ContinuousClock.now + self.configuration.rpcTimeout
        while true {
            if let content = self.completedGet {
                self.completedGet = nil
                return content
            }
            guard self.isConnected, let conn = self.conn else { throw self.shared.closedError() }
            guard let frame = try self.nextFrame(conn, deadline: deadline, doing: doing, timeoutWording: "took longer than") else { continue }
            self.dispatch(frame, conn: conn)
        }
    }

    /// Waits up to 100 ms (never past `deadline`) for the next frame: nil when none came yet.
    /// Past the deadline, or on a library error, the connection is lost and the error thrown.
    private func nextFrame(_ conn: amqp_connection_state_t, deadline: ContinuousClock.Instant, doing: String,
                           timeoutWording: String) throws(AMQPError) -> amqp_frame_t? {
        let left = deadline - ContinuousClock.now
        guard left > .zero else {
            let error = AMQPError(code: .timeout, message: "\(doing) \(timeoutWording) \(self.configuration.rpcTimeout)")
            self.connectionLost(error)
            throw error
        }
        var frame = amqp_frame_t()
        var wait = Self.makeTimeval(min(left, .milliseconds(100)))
        let status = amqp_simple_wait_frame_noblock(conn, &frame, &wait)
        if status == AMQP_STATUS_TIMEOUT.rawValue { return nil }
        guard status == AMQP_STATUS_OK.rawValue else {
            let error = Self.libraryError(status, doing: doing)
            self.connectionLost(error)
            throw error
        }
        self.noteReceived()
        return frame
    }

    // MARK: Acknowledgements

    enum AckKind { case ack, nack(requeue: Bool), reject(requeue: Bool) }

    /// Sends an ack, nack or reject, unless the channel was reopened since the delivery: its tag
    /// is dead (acking it would close the channel) and the broker has already requeued it.
    /// Single acks wait for the end of the thread's turn (``flushAcks()``) to be coalesced.
    func acknowledge(_ id: UInt16, epoch: UInt64, tag: UInt64, multiple: Bool, kind: AckKind) {
        guard self.isConnected, let conn = self.conn, let channel = self.channels[id], channel.isOpen,
              channel.epoch == epoch
        else {
            self.logger.debug("amqp ack for a delivery from a closed channel dropped; the broker requeued it",
                              metadata: ["amqp.channel.id": "\(id)", "delivery_tag": "\(tag)"])
            return
        }
        if case .ack = kind, !multiple {
            if channel.pendingAcks.isEmpty { self.channelsWithPendingAcks.append(id) }
            channel.pendingAcks.append(tag)
            return
        }
        self.flushAcks(channel, releaseHeld: true)
        guard self.isConnected else { return }
        let status: Int32
        switch kind {
        case .ack: status = amqp_basic_ack(conn, id, tag, multiple ? 1 : 0)
        case .nack(let requeue): status = amqp_basic_nack(conn, id, tag, multiple ? 1 : 0, requeue ? 1 : 0)
        case .reject(let requeue): status = amqp_basic_reject(conn, id, tag, requeue ? 1 : 0)
        }
        if multiple { channel.markSettled(through: tag) } else { channel.markSettled(tag) }
        if status != AMQP_STATUS_OK.rawValue {
            self.connectionLost(Self.libraryError(status, doing: "acknowledging delivery \(tag)"))
        }
    }

    /// Sends the acks queued in this turn.
    func flushAcks() {
        guard !self.channelsWithPendingAcks.isEmpty else { return }
        let ids = self.channelsWithPendingAcks
        self.channelsWithPendingAcks.removeAll(keepingCapacity: true)
        for id in ids {
            guard let channel = self.channels[id] else { continue }
            self.flushAcks(channel)
        }
    }

    /// `releaseHeld`: held-back acks go too (before a close, a cancel, a commit, a nack).
    func flushAcks(_ channel: ChannelState, releaseHeld: Bool = false) {
        guard !channel.pendingAcks.isEmpty || (releaseHeld && !channel.heldAcks.isEmpty) else { return }
        let (through, singles) = channel.takeAckBatch(releaseHeld: releaseHeld)
        if channel.heldSince != nil, !self.channelsHoldingAcks.contains(channel.id) { self.channelsHoldingAcks.append(channel.id) }
        guard self.isConnected, let conn = self.conn, channel.isOpen else { return }
        var status = AMQP_STATUS_OK.rawValue
        if let through { status = amqp_basic_ack(conn, channel.id, through, 1) }
        for tag in singles where status == AMQP_STATUS_OK.rawValue {
            status = amqp_basic_ack(conn, channel.id, tag, 0)
        }
        if status != AMQP_STATUS_OK.rawValue {
            self.connectionLost(Self.libraryError(status, doing: "acknowledging deliveries"))
        }
    }

    /// Sends held-back acks whose time is up (or all of them with `all`). Returns when the next
    /// held ack is due, if any.
    @discardableResult
    func releaseHeldAcks(all: Bool = false, now: ContinuousClock.Instant = .now) -> ContinuousClock.Instant? {
        guard !self.channelsHoldingAcks.isEmpty else { return nil }
        var next: ContinuousClock.Instant?
        let ids = self.channelsHoldingAcks
        self.channelsHoldingAcks.removeAll(keepingCapacity: true)
        for id in ids {
            guard let channel = self.channels[id], let deadline = channel.heldDeadline else { continue }
            if all || deadline <= now {
                self.flushAcks(channel, releaseHeld: true)
            } else {
                self.channelsHoldingAcks.append(id)
                next = next.map { min($0, deadline) } ?? deadline
            }
        }
        return next
    }
}
