internal import CAQRabbitMQ

extension ConnectionDriver {
    // MARK: - The choke point for RPC replies

    /// Turns a failed RPC reply into an error, after doing what the protocol requires: answer a
    /// `channel.close` with `close-ok` and reopen the channel, or tear down a dead connection.
    func check(_ reply: amqp_rpc_reply_t, channel: UInt16, doing: String, reopenOnClose: Bool = true) throws(AMQPError) {
        switch reply.reply_type {
        case AMQP_RESPONSE_NORMAL:
            return
        case AMQP_RESPONSE_LIBRARY_EXCEPTION:
            let error = Self.libraryError(reply.library_error, doing: doing)
            self.connectionLost(error)
            throw error
        case AMQP_RESPONSE_SERVER_EXCEPTION:
            let error = Self.serverError(reply, doing: doing)
            if reply.reply.id == AMQP_CHANNEL_CLOSE_METHOD {
                self.sendChannelCloseOk(channel)
                self.channelClosed(channel, error, reopen: reopenOnClose, stash: false)
            } else {
                self.sendConnectionCloseOk()
                self.connectionLost(error)
            }
            throw error
        default:
            let error = AMQPError(code: .protocolError, message: "\(doing) failed: no reply from the broker")
            self.connectionLost(error)
            throw error
        }
    }

    /// The error a server `channel.close` or `connection.close` reply stands for. Pure.
    static func serverError(_ reply: amqp_rpc_reply_t, doing: String) -> AMQPError {
        guard let decoded = reply.reply.decoded else {
            return AMQPError(code: .protocolError, message: "\(doing) failed: the broker sent an unexpected method")
        }
        switch reply.reply.id {
        case AMQP_CHANNEL_CLOSE_METHOD:
            let close = decoded.assumingMemoryBound(to: amqp_channel_close_t.self).pointee
            return self.closeError(code: .channelClosedByServer, replyCode: close.reply_code, text: close.reply_text,
                                   classId: close.class_id, methodId: close.method_id, doing: doing)
        case AMQP_CONNECTION_CLOSE_METHOD:
            let close = decoded.assumingMemoryBound(to: amqp_connection_close_t.self).pointee
            return self.closeError(code: .connectionClosedByServer, replyCode: close.reply_code, text: close.reply_text,
                                   classId: close.class_id, methodId: close.method_id, doing: doing)
        default:
            return AMQPError(code: .protocolError, message: "\(doing) failed: the broker sent method 0x\(String(reply.reply.id, radix: 16))")
        }
    }

    static func closeError(code: AMQPError.Code, replyCode: UInt16, text: amqp_bytes_t, classId: UInt16, methodId: UInt16, doing: String) -> AMQPError {
        let replyText = CDecode.string(text)
        let method = Self.methodName(classId: classId, methodId: methodId)
        let who = code == .channelClosedByServer ? "the broker closed the channel" : "the broker closed the connection"
        return AMQPError(code: code, message: "\(doing) failed: \(who): \(replyText)",
                         replyCode: AMQPError.ReplyCode(rawValue: replyCode), replyText: replyText, method: method)
    }

    static func methodName(classId: UInt16, methodId: UInt16) -> String? {
        switch (classId, methodId) {
        case (0, _): return nil
        case (10, 40): return "connection.open"
        case (20, 10): return "channel.open"
        case (40, 10): return "exchange.declare"
        case (40, 20): return "exchange.delete"
        case (40, 30): return "exchange.bind"
        case (40, 40): return "exchange.unbind"
        case (50, 10): return "queue.declare"
        case (50, 20): return "queue.bind"
        case (50, 30): return "queue.purge"
        case (50, 40): return "queue.delete"
        case (50, 50): return "queue.unbind"
        case (60, 10): return "basic.qos"
        case (60, 20): return "basic.consume"
        case (60, 30): return "basic.cancel"
        case (60, 40): return "basic.publish"
        case (60, 70): return "basic.get"
        case (60, 80): return "basic.ack"
        case (60, 90): return "basic.reject"
        case (60, 120): return "basic.nack"
        case (85, 10): return "confirm.select"
        default: return "method \(classId).\(methodId)"
        }
    }

    func sendChannelCloseOk(_ channel: UInt16) {
        guard let conn = self.conn else { return }
        var ok = amqp_channel_close_ok_t()
        _ = amqp_send_method(conn, channel, AMQP_CHANNEL_CLOSE_OK_METHOD, &ok)
    }

    func sendConnectionCloseOk() {
        guard let conn = self.conn else { return }
        var ok = amqp_connection_close_ok_t()
        _ = amqp_send_method(conn, 0, AMQP_CONNECTION_CLOSE_OK_METHOD, &ok)
    }

    /// The broker closed a channel: fail its pending confirms (outcome unknown) and reopen it.
    func channelClosed(_ id: UInt16, _ error: AMQPError, reopen: Bool, stash: Bool) {
        guard let channel = self.channels[id] else { return }
        self.logger.debug("amqp channel closed by broker", metadata: ["amqp.channel.id": "\(id)", "error": "\(error)"])
        channel.isOpen = false
        channel.nackedSince = nil
        var failed: [PublishCompletion] = []
        channel.tracker.reset { _, pending in failed.append(pending.completion) }
        let hadPending = !failed.isEmpty
        // Completed only once the tracker is no longer being changed: a completion may publish.
        for completion in failed { completion.complete(.failure(error.outcomeUnknown())) }
        if stash && !hadPending { channel.pendingError = error }
        guard reopen, self.isConnected else { return }
        do throws(AMQPError) {
            try self.reopen(channel)
        } catch {
            self.logger.warning("could not reopen amqp channel", metadata: ["amqp.channel.id": "\(id)", "error": "\(error)"])
        }
    }

    // MARK: - Frames

    func dispatch(_ frame: amqp_frame_t, conn: amqp_connection_state_t) {
        switch Int32(frame.frame_type) {
        case AMQP_FRAME_METHOD: self.dispatchMethod(frame, conn: conn)
        case AMQP_FRAME_HEADER: self.contentHeader(frame)
        case AMQP_FRAME_BODY: self.contentBody(frame)
        default: break
        }
    }

    private func dispatchMethod(_ frame: amqp_frame_t, conn: amqp_connection_state_t) {
        let id = frame.channel
        let method = frame.payload.method
        if !self.incoming.isEmpty, self.incoming[id] != nil {  // (most method frames come with none: no hashing)
            // AMQP sends a message's content frames right after its method, on its channel.
            return self.contentBroke(id, "a method frame arrived on channel \(id) in the middle of a message's content")
        }
        switch method.id {
        case AMQP_BASIC_DELIVER_METHOD:
            guard let decoded = method.decoded else { return }
            let deliver = decoded.assumingMemoryBound(to: amqp_basic_deliver_t.self).pointee
            let consumer = self.channels[id]?.consumer(tagged: deliver.consumer_tag)
            let consumerTag = consumer?.tag ?? CDecode.string(deliver.consumer_tag)
            let maxBody = consumer?.maxBodyBytes ?? self.configuration.contentLimits.maxBodyBytes
            self.incoming[id] = IncomingContent(
                origin: .deliver(consumerTag: consumerTag, deliveryTag: deliver.delivery_tag, redelivered: deliver.redelivered != 0,
                                 exchange: CDecode.string(deliver.exchange), routingKey: CDecode.string(deliver.routing_key)),
                maxBodyBytes: maxBody)

        case AMQP_BASIC_ACK_METHOD:
            guard let decoded = method.decoded, let channel = self.channels[id] else { return }
            let ack = decoded.assumingMemoryBound(to: amqp_basic_ack_t.self).pointee
            var confirmed: [PendingPublish] = []
            channel.tracker.resolve(tag: ack.delivery_tag, multiple: ack.multiple != 0) { _, pending in confirmed.append(pending) }
            channel.nackedSince = nil
            // Completed once the tracker is no longer being changed: a completion may publish
            // again on this channel (a reply, then a dead letter, say).
            for pending in confirmed {
                pending.completion.complete(.success(pending.returned.map { .returned($0) } ?? .confirmed))
            }

        case AMQP_BASIC_NACK_METHOD:
            guard let decoded = method.decoded, let channel = self.channels[id] else { return }
            let nack = decoded.assumingMemoryBound(to: amqp_basic_nack_t.self).pointee
            var refused: [PendingPublish] = []
            channel.tracker.resolve(tag: nack.delivery_tag, multiple: nack.multiple != 0) { _, pending in refused.append(pending) }
            let now = ContinuousClock.now
            if refused.isEmpty {
                // A nack for nothing outstanding (it came before a reopen): not a streak.
            } else if let since = channel.nackedSince {
                // Only nacks for a while: reopened at the end of this turn (see `nackedSince`).
                if now - since >= Self.nackStreakLimit, !channel.transactional { channel.recycleRequested = true }
            } else {
                channel.nackedSince = now
            }
            for pending in refused {
                pending.completion.complete(.failure(AMQPError(
                    code: .publishNacked,
                    message: "the broker did not take the message published to exchange '\(pending.exchange)' with routing key '\(pending.routingKey)' (basic.nack; e.g. a full queue with overflow reject-publish)")))
            }

        case AMQP_BASIC_RETURN_METHOD:
            guard let decoded = method.decoded else { return }
            let ret = decoded.assumingMemoryBound(to: amqp_basic_return_t.self).pointee
            self.incoming[id] = IncomingContent(
                origin: .returned(replyCode: ret.reply_code, replyText: CDecode.string(ret.reply_text),
                                  exchange: CDecode.string(ret.exchange), routingKey: CDecode.string(ret.routing_key)),
                maxBodyBytes: self.configuration.contentLimits.maxBodyBytes)

        case AMQP_BASIC_CANCEL_METHOD:
            guard let decoded = method.decoded, let channel = self.channels[id] else { return }
            let cancel = decoded.assumingMemoryBound(to: amqp_basic_cancel_t.self).pointee
            let tag = CDecode.string(cancel.consumer_tag)
            self.handOverDeliveries()
            if let consumer = channel.consumers.removeValue(forKey: tag) {
                consumer.end(AMQPError(
                    code: .consumerCancelled,
                    message: "the broker cancelled consumer '\(tag)' on queue '\(consumer.queue)' (the queue was deleted or its node went away)"))
            }

        case AMQP_CHANNEL_CLOSE_METHOD:
            guard let decoded = method.decoded else { return }
            let close = decoded.assumingMemoryBound(to: amqp_channel_close_t.self).pointee
            let error = Self.closeError(code: .channelClosedByServer, replyCode: close.reply_code, text: close.reply_text,
                                        classId: close.class_id, methodId: close.method_id,
                                        doing: Self.methodName(classId: close.class_id, methodId: close.method_id) ?? "an earlier operation")
            self.sendChannelCloseOk(id)
            self.channelClosed(id, error, reopen: true, stash: true)

        case AMQP_CONNECTION_CLOSE_METHOD:
            guard let decoded = method.decoded else { return }
            let close = decoded.assumingMemoryBound(to: amqp_connection_close_t.self).pointee
            let error = Self.closeError(code: .connectionClosedByServer, replyCode: close.reply_code, text: close.reply_text,
                                        classId: close.class_id, methodId: close.method_id, doing: "the connection")
            self.sendConnectionCloseOk()
            self.connectionLost(error)

        case AMQP_CONNECTION_BLOCKED_METHOD:
            var reason = ""
            if let decoded = method.decoded {
                reason = CDecode.string(decoded.assumingMemoryBound(to: amqp_connection_blocked_t.self).pointee.reason)
            }
            self.blocked = true
            self.logger.warning("amqp connection blocked by the broker", metadata: ["reason": "\(reason)"])
            self.shared.emit(.blocked(reason: reason))

        case AMQP_CONNECTION_UNBLOCKED_METHOD:
            self.blocked = false
            self.shared.emit(.unblocked)
            let held = self.held
            self.held.removeAll()
            for publish in held { publish() }

        default:
            break
        }
    }

    // MARK: - Content frames

    /// A content header frame: the message's properties (checked against the limits before they
    /// are copied) and its body size.
    private func contentHeader(_ frame: amqp_frame_t) {
        let id = frame.channel
        guard let index = self.incoming.index(forKey: id) else {
            return self.contentBroke(id, "a content header frame arrived on channel \(id) without a deliver, return or get-ok")
        }
        let header = frame.payload.properties
        let properties: Result<AMQPProperties, ContentProblem>
        if let decoded = header.decoded {
            let c = decoded.assumingMemoryBound(to: amqp_basic_properties_t.self).pointee
            if let problem = CDecode.check(c, limits: self.configuration.contentLimits) {
                properties = .failure(problem)
            } else {
                properties = .success(CDecode.properties(c))
            }
        } else {
            properties = .success(AMQPProperties())
        }
        self.contentStep(id, index, self.incoming.values[index].header(properties: properties, bodySize: header.body_size))
    }

    private func contentBody(_ frame: amqp_frame_t) {
        let id = frame.channel
        guard let index = self.incoming.index(forKey: id) else {
            return self.contentBroke(id, "a content body frame arrived on channel \(id) without a message")
        }
        let fragment = frame.payload.body_fragment
        let bytes = UnsafeRawBufferPointer(start: fragment.bytes, count: fragment.bytes == nil ? 0 : fragment.len)
        self.contentStep(id, index, self.incoming.values[index].body(bytes))
    }

    /// What feeding channel `id`'s content (at `index` of `incoming`) came to. The content is fed
    /// in place through `incoming.values[index]` (`incoming[id]?.f()` goes through Dictionary's
    /// optional-yielding modify accessor, whose coroutine frame is heap-allocated for a value this
    /// size: a malloc per frame) and taken out at the same index: one hash per frame.
    private func contentStep(_ id: UInt16, _ index: Dictionary<UInt16, IncomingContent>.Index, _ step: IncomingContent.Step) {
        switch step {
        case .needMore: return
        case .protocolError(let why): self.contentBroke(id, why)
        case .complete: self.contentComplete(id, self.incoming.remove(at: index).value)
        }
    }

    /// The frames broke AMQP's rules for content: nothing on this connection can be trusted.
    private func contentBroke(_ id: UInt16, _ why: String) {
        self.incoming[id] = nil
        self.connectionLost(AMQPError(code: .protocolError, message: "the broker broke the protocol: \(why)"))
    }

    private func contentComplete(_ id: UInt16, _ content: IncomingContent) {
        switch content.origin {
        case .deliver(let consumerTag, let deliveryTag, let redelivered, let exchange, let routingKey):
            guard let conn = self.conn else { return }
            guard let channel = self.channels[id], let consumer = channel.consumer(consumerTag) else {
                // A delivery for a consumer we already cancelled: hand it back.
                if let channel = self.channels[id] {
                    self.flushAcks(channel, releaseHeld: true)
                    channel.markSettled(deliveryTag)
                }
                _ = amqp_basic_reject(conn, id, deliveryTag, 1)
                return
            }
            if let problem = content.problem {
                // Only this delivery pays: it is rejected alone (the queue's dead-letter exchange
                // keeps it whole, with x-death reason "rejected"), and the connection carries on.
                self.logger.warning("amqp delivery could not be read; rejected without requeue", metadata: [
                    "queue": "\(consumer.queue)", "message_id": "\(content.properties?.messageId ?? "-")", "problem": "\(problem)",
                ])
                if consumer.noAck {
                    channel.markSettled(deliveryTag)
                } else {
                    self.acknowledge(id, epoch: channel.epoch, tag: deliveryTag, multiple: false, kind: .reject(requeue: false))
                }
                consumer.onUnreadable?(AMQPUnreadableDelivery(
                    properties: content.properties, problem: problem, bodySize: content.bodySize ?? 0, exchange: exchange,
                    routingKey: routingKey, deliveryTag: deliveryTag, isRedelivered: redelivered))
                return
            }
            if consumer.noAck { channel.markSettled(deliveryTag) }
            let delivery = AMQPDelivery(
                body: content.body, properties: content.properties ?? AMQPProperties(), exchange: exchange, routingKey: routingKey,
                deliveryTag: deliveryTag, isRedelivered: redelivered, consumerTag: consumerTag, messageCount: nil,
                acker: consumer.noAck ? nil : DeliveryAcker(shared: self.shared, channel: id, epoch: channel.epoch))
            if let handler = consumer.handler {
                handler(delivery)
            } else {
                if consumer.ready.isEmpty { self.readyConsumers.append(consumer) }
                consumer.ready.append(delivery)
            }

        case .returned(let replyCode, let replyText, let exchange, let routingKey):
            guard let channel = self.channels[id] else { return }
            let returned = AMQPReturnedMessage(
                replyCode: replyCode, replyText: replyText, exchange: exchange, routingKey: routingKey,
                properties: content.properties ?? AMQPProperties(), body: content.body)
            if channel.transactional {
                channel.returnedInTransaction.append(returned)
                return
            }
            // The return precedes its publish's ack. It names the publish by exchange, routing
            // key and message id together (two publishes may share an id); oldest first.
            let messageId = content.properties?.messageId
            let readable = content.properties != nil
            let matched = channel.tracker.updateFirst(where: { pending in
                guard pending.returned == nil, pending.exchange == exchange, pending.routingKey == routingKey else { return false }
                return !readable || pending.messageId == messageId
            }) { $0.returned = returned }
            if !matched {
                self.logger.debug("amqp basic.return for no tracked publish", metadata: ["exchange": "\(exchange)", "routing_key": "\(routingKey)"])
            }

        case .getOk:
            self.completedGet = content
        }
    }
}
