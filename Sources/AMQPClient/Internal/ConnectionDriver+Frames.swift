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
        var hadPending = false
        channel.tracker.reset { _, pending in
            hadPending = true
            pending.completion.complete(.failure(error.outcomeUnknown()))
        }
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
        guard frame.frame_type == UInt8(AMQP_FRAME_METHOD) else { return }
        let id = frame.channel
        let method = frame.payload.method
        switch method.id {
        case AMQP_BASIC_DELIVER_METHOD:
            guard let decoded = method.decoded else { return }
            let deliver = decoded.assumingMemoryBound(to: amqp_basic_deliver_t.self).pointee
            let consumerTag = CDecode.string(deliver.consumer_tag)
            let exchange = CDecode.string(deliver.exchange)
            let routingKey = CDecode.string(deliver.routing_key)
            guard let (properties, body) = self.readContent(conn, channel: id, doing: "reading a delivery") else { return }
            guard let channel = self.channels[id], let consumer = channel.consumers[consumerTag] else {
                // A delivery for a consumer we already cancelled: hand it back.
                if let channel = self.channels[id] {
                    self.flushAcks(channel)
                    channel.markSettled(deliver.delivery_tag)
                }
                _ = amqp_basic_reject(conn, id, deliver.delivery_tag, 1)
                return
            }
            if consumer.noAck { channel.markSettled(deliver.delivery_tag) }
            let delivery = AMQPDelivery(
                body: body, properties: properties, exchange: exchange, routingKey: routingKey,
                deliveryTag: deliver.delivery_tag, isRedelivered: deliver.redelivered != 0,
                consumerTag: consumerTag, messageCount: nil,
                acker: consumer.noAck ? nil : DeliveryAcker(shared: self.shared, channel: id, epoch: channel.epoch))
            if let handler = consumer.handler {
                handler(delivery)
            } else {
                if consumer.ready.isEmpty { self.readyConsumers.append(consumer) }
                consumer.ready.append(delivery)
            }

        case AMQP_BASIC_ACK_METHOD:
            guard let decoded = method.decoded, let channel = self.channels[id] else { return }
            let ack = decoded.assumingMemoryBound(to: amqp_basic_ack_t.self).pointee
            channel.tracker.resolve(tag: ack.delivery_tag, multiple: ack.multiple != 0) { _, pending in
                if let returned = pending.returned {
                    pending.completion.complete(.success(.returned(returned)))
                } else {
                    pending.completion.complete(.success(.confirmed))
                }
            }

        case AMQP_BASIC_NACK_METHOD:
            guard let decoded = method.decoded, let channel = self.channels[id] else { return }
            let nack = decoded.assumingMemoryBound(to: amqp_basic_nack_t.self).pointee
            channel.tracker.resolve(tag: nack.delivery_tag, multiple: nack.multiple != 0) { sequence, pending in
                pending.completion.complete(.failure(AMQPError(
                    code: .publishNacked,
                    message: "the broker did not take the message published to exchange '\(pending.exchange)' with routing key '\(pending.routingKey)' (basic.nack; e.g. a full queue with overflow reject-publish)")))
            }

        case AMQP_BASIC_RETURN_METHOD:
            guard let decoded = method.decoded else { return }
            let ret = decoded.assumingMemoryBound(to: amqp_basic_return_t.self).pointee
            let replyCode = ret.reply_code
            let replyText = CDecode.string(ret.reply_text)
            let exchange = CDecode.string(ret.exchange)
            let routingKey = CDecode.string(ret.routing_key)
            guard let (properties, body) = self.readContent(conn, channel: id, doing: "reading a returned message") else { return }
            guard let channel = self.channels[id] else { return }
            let returned = AMQPReturnedMessage(
                replyCode: replyCode, replyText: replyText, exchange: exchange, routingKey: routingKey,
                properties: properties, body: body)
            // The return precedes the publish's ack. Match by message id, else by the oldest
            // unresolved publish to the same exchange and routing key without a message id.
            let messageId = properties.messageId
            let matched = channel.tracker.updateFirst(where: { pending in
                guard pending.returned == nil else { return false }
                if let messageId { return pending.messageId == messageId }
                return pending.messageId == nil && pending.exchange == exchange && pending.routingKey == routingKey
            }) { $0.returned = returned }
            if !matched {
                self.logger.debug("amqp basic.return for no tracked publish", metadata: ["exchange": "\(exchange)", "routing_key": "\(routingKey)"])
            }

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

    /// Reads the header and body frames that follow a deliver, return or get-ok; copies them.
    func readContent(_ conn: amqp_connection_state_t, channel: UInt16, doing: String) -> (AMQPProperties, [UInt8])? {
        var message = amqp_message_t()
        let reply = amqp_read_message(conn, channel, &message, 0)
        guard reply.reply_type == AMQP_RESPONSE_NORMAL else {
            let error = reply.reply_type == AMQP_RESPONSE_LIBRARY_EXCEPTION
                ? Self.libraryError(reply.library_error, doing: doing)
                : AMQPError(code: .protocolError, message: "\(doing) failed: unexpected frame")
            self.connectionLost(error)
            return nil
        }
        defer { amqp_destroy_message(&message) }
        return (CDecode.properties(message.properties), CDecode.array(message.body))
    }
}
