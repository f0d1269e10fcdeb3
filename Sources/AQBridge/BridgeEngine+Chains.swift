import AMQPClient
import Foundation

/// A chain step in flight: the context its message carries.
/// A chain step being run. A class: the run and the step's closures share it (a struct this size
/// was copied, and each of its dozen references retained and released, at every hand-over).
final class ChainRun: Sendable {
    let message: ChainMessage
    let step: Int
    /// When its step message was published (Unix ms): the step's start.
    let startedAt: Int64
    /// The work queue the chain lives on (webhook jobs go there).
    let home: String

    init(message: ChainMessage, step: Int, startedAt: Int64, home: String) {
        self.message = message
        self.step = step
        self.startedAt = startedAt
        self.home = home
    }
}

extension BridgeEngine {
    // MARK: Chains

    /// A message with `chain`: a create publishes step 1; a step message runs its step's
    /// callback like a task, with the chain's context as its body.
    func chainMessage(_ run: Run) {
        let known = self.workQueueNames
        let parsed = ChainParser.parse(run.delivery.body, messageId: run.delivery.properties.messageId, defaults: run.queue.defaults,
                                       isWorkQueue: { known.contains($0) })
        var message: ChainMessage
        switch parsed {
        case .failure(let malformed):
            return self.rejectMalformed(run, "chain", malformed.reason, webhook: malformed.notify)
        case .success(let value):
            message = value
        }
        let home = message.queue ?? run.queue.name
        message.queue = home
        var inPlace = false
        if message.step == nil {
            self.count(.chainsCreated)
            guard message.batches[0] == nil, (message.queues[0] ?? home) == run.queue.name else {
                // Step 1 runs elsewhere (another queue, or a batch): it goes out (confirmed),
                // then the create is acked.
                return self.publishStep(message, step: 1, history: [], results: [], traceparent: run.traceparent) { [unowned self] result in
                    guard self.isActive(run) else { return }
                    switch result {
                    case .success: self.ack(run)
                    case .failure(let error) where error.code == .invalidArgument:
                        self.rejectMalformed(run, "chain", "its first step could not be published: \(error.message)", taskId: message.id,
                                             webhook: message.failureWebhookURL ?? message.webhookURL)
                    case .failure(let error): self.requeue(run, "could not start chain \(message.id): \(error)")
                    }
                }
            }
            // Step 1 is a task on this queue: it runs from the create, which becomes its step
            // message (no trip through the broker); a retry or a dead letter carries that message.
            switch self.stepBody(message, step: 1, history: [], results: []) {
            case .failure(let error):
                return self.rejectMalformed(run, "chain", "its first step could not be published: \(error.message)", taskId: message.id,
                                            webhook: message.failureWebhookURL ?? message.webhookURL)
            case .success(let body):
                run.delivery = run.delivery.with(body: body)
                self.hold(run, bytes: body.count)  // the create's bytes stay with the parsed context
                message.step = 1
                inPlace = true
            }
        }
        guard let step = message.step else { return }
        if let batch = message.batches[step - 1] {
            // A step that fans out: its batch is created (broker round trips: from the turn).
            return self.batchWork.append { [unowned self] in self.chainBatchStep(run, message, step: step, batch: batch) }
        }
        guard var task = message.specs[step - 1] else { return self.requeue(run, "chain step \(step) is neither a task nor a batch") }
        task.payload = message.callbackBody(step: step)[...]
        task.traceparent = nil  // a step's trace context is its message's header (see Run.traceparent)
        task.webhookURL = nil
        task.failureWebhookURL = nil
        // When its message was published: the bridge's own millisecond stamp, else the AMQP
        // timestamp (seconds), else now.
        let stamp = run.trusted ? run.delivery.properties.headers?["aq-step-at"]?.intValue : nil
        let now = Self.unixMilliseconds()
        let published = run.delivery.properties.timestamp.flatMap { $0 <= UInt64(now / 1000) ? Int64($0) * 1000 : nil }
        // Step 1 run from its create starts now (the create's timestamp has only seconds).
        let started = inPlace ? now : stamp ?? published ?? now
        run.chain = ChainRun(message: message, step: step, startedAt: started, home: home)
        run.task = task
        self.proceed(run, task)
    }

    /// Step `step`'s message, within its work queue's `max_payload_bytes`.
    func stepBody(_ message: ChainMessage, step: Int, history: [ArraySlice<UInt8>], results: [ArraySlice<UInt8>]) -> Result<[UInt8], AMQPError> {
        let body = message.stepMessage(step: step, history: history, results: results)
        let limit = self.settings.queues.first { $0.name == (message.queues[step - 1] ?? message.queue) }?.defaults.maxPayloadBytes
            ?? TaskDefaults().maxPayloadBytes
        guard body.count <= limit else {
            return .failure(AMQPError(code: .invalidArgument, message: "the chain's context for step \(step) is \(body.count) bytes, over max_payload_bytes (\(limit))"))
        }
        return .success(body)
    }

    /// Publishes step `step` of the chain to `aq.chain`, routed to its work queue.
    func publishStep(_ message: ChainMessage, step: Int, history: [ArraySlice<UInt8>], results: [ArraySlice<UInt8>], traceparent: String? = nil,
                     _ done: @escaping (Result<Void, AMQPError>) -> Void) {
        let body: [UInt8]
        switch self.stepBody(message, step: step, history: history, results: results) {
        case .failure(let error): return done(.failure(error))
        case .success(let value): body = value
        }
        let queue = message.queues[step - 1] ?? message.queue ?? "default"
        let properties = self.stepProperties(message, step: step, traceparent: traceparent,
                                             adding: ["aq-chain": .string(message.id), "aq-chain-step": .int32(Int32(step))])
        self.publish(exchange: self.settings.spec.chainExchange, routingKey: "\(queue).\(message.id).\(step)", properties: properties, body: body, done)
    }

    /// A step message's properties: its stable id, when it was published (Unix ms, the step's
    /// start), the chain's trace context, and `ours`.
    private func stepProperties(_ message: ChainMessage, step: Int, traceparent: String?, adding ours: AMQPTable) -> AMQPProperties {
        var headers = ours
        headers["aq-step-at"] = .int64(Self.unixMilliseconds())
        if let traceparent { headers["traceparent"] = .string(traceparent) }
        return AMQPProperties(contentType: "application/json", headers: headers, deliveryMode: .persistent, messageId: "\(message.id):\(step)",
                              timestamp: UInt64(Date().timeIntervalSince1970), userId: self.settings.bridgeUser)
    }

    /// A webhook job for a chain (published to its work queue, confirmed; delivered like any webhook).
    func chainWebhook(_ chain: ChainRun, url: String, id: String, body: [UInt8], _ done: @escaping (Result<Void, AMQPError>) -> Void) {
        let properties = self.webhookJob(url: url, taskId: chain.message.id, attempt: 1, tier: nil, lastError: nil, webhookId: id)
        self.publish(exchange: "", routingKey: self.settings.spec.queueName(forWorkQueue: chain.home), properties: properties, body: body, done)
    }

    private func historyEntry(_ run: Run, _ chain: ChainRun, completed: Bool) -> ArraySlice<UInt8> {
        chain.message.historyEntry(step: chain.step, attempts: run.attempt, completed: completed, startedAt: chain.startedAt, endedAt: Self.unixMilliseconds())
    }

    /// A step succeeded: the next step goes out (confirmed); then the step webhook, or after the
    /// last step the chain's final webhook, is delivered like a task's webhook (retried on its
    /// own schedule if it fails) before the step is acked.
    func chainStepCompleted(_ run: Run, _ chain: ChainRun, result: [UInt8]) {
        let message = chain.message
        let history = message.history + [self.historyEntry(run, chain, completed: true)]
        let stepId = "\(message.id):\(chain.step)"
        let stepHook = message.stepWebhookURL.map { url in (url, message.stepWebhookBody(step: chain.step, result: result)) }
        self.emit(.chainStepCompleted, queue: run.queue.name, taskId: stepId, attempt: run.attempt, run: run,
                  fields: ",\"chainId\":\(JSONScan.quote(message.id)),\"step\":\(chain.step)")
        guard chain.step < message.steps.count else {
            self.count(.chainsCompleted)
            self.emit(.chainCompleted, queue: chain.home, taskId: message.id, fields: ",\"chainId\":\(JSONScan.quote(message.id)),\"steps\":\(message.steps.count)")
            let finish = { [unowned self] in
                guard let url = message.webhookURL else { return self.ack(run) }
                self.webhook(run, url: url, taskId: stepId, body: message.finalWebhookBody(result: result, history: history), attempt: 1, id: message.id)
            }
            // The last step's own webhook, when both are wanted, goes as a webhook job first.
            guard let (url, body) = stepHook else { return finish() }
            return self.chainWebhook(chain, url: url, id: "\(stepId):result", body: body) { [unowned self] outcome in
                guard self.isActive(run) else { return }
                if case .failure(let error) = outcome, error.code != .invalidArgument { return self.requeue(run, "could not send chain \(message.id)'s step webhook: \(error)") }
                finish()
            }
        }
        self.publishStep(message, step: chain.step + 1, history: history, results: message.results + [result[...]],
                         traceparent: run.traceparent) { [unowned self] outcome in
            guard self.isActive(run) else { return }
            switch outcome {
            case .success:
                guard let (url, body) = stepHook else { return self.ack(run) }
                self.webhook(run, url: url, taskId: stepId, body: body, attempt: 1, id: "\(stepId):result")
            case .failure(let error) where error.code == .invalidArgument:
                // The chain cannot go on (its context outgrew the limit): it fails at this step.
                guard let task = run.task else { return self.ack(run) }
                self.failed(run, task, outcome: .permanent(reason: error.message, status: nil), responseBody: [])
            case .failure(let error):
                // The next step's queue refused it (full, say): running this step's callback again
                // would be wrong, so the next step waits in a retry tier and enters its queue from
                // there; only if that fails too is the step handed back.
                self.parkNextStep(message, step: chain.step + 1, history: history, results: message.results + [result[...]],
                                  traceparent: run.traceparent) { [unowned self] parked in
                    guard self.isActive(run) else { return }
                    if parked { return self.ack(run) }
                    self.requeue(run, "could not advance chain \(message.id): \(error)")
                }
            }
        }
    }

    /// Publishes the next step's message to the parking tier, routed back to its work queue.
    private func parkNextStep(_ message: ChainMessage, step: Int, history: [ArraySlice<UInt8>], results: [ArraySlice<UInt8>],
                              traceparent: String?, _ done: @escaping (Bool) -> Void) {
        guard let tier = self.parkTier else { return done(false) }
        let queue = message.queues[step - 1] ?? message.queue ?? "default"
        let properties = self.stepProperties(message, step: step, traceparent: traceparent,
                                             adding: ["retry-tier": .string(self.settings.spec.retryTierHeader(for: tier))])
        self.publish(exchange: self.settings.spec.retryExchange, routingKey: self.settings.spec.queueName(forWorkQueue: queue), properties: properties,
                     body: message.stepMessage(step: step, history: history, results: results)) { result in
            if case .success = result { done(true) } else { done(false) }
        }
    }

    /// A step failed for good (it is in the dead-letter queue with the whole context, so
    /// publishing it back resumes the chain there): the chain's failure webhook is delivered
    /// (retried on its own schedule if it fails), then the step is acked.
    func chainStepFailed(_ run: Run, _ chain: ChainRun, _ outcome: Outcome) {
        self.count(.chainsFailed)
        self.emit(.chainFailed, queue: chain.home, taskId: chain.message.id,
                  fields: ",\"chainId\":\(JSONScan.quote(chain.message.id)),\"failedStep\":\(chain.step)")
        let message = chain.message
        guard let url = message.failureWebhookURL ?? message.webhookURL, let failure = outcome.failure else { return self.ack(run) }
        let history = message.history + [self.historyEntry(run, chain, completed: false)]
        let error = "{\"reason\":\(JSONScan.quote(failure.reason)),\"message\":\(JSONScan.quote(failure.message)),\"status\":\(failure.status.map(String.init) ?? "null")}"
        self.webhook(run, url: url, taskId: "\(message.id):\(chain.step)", body: message.failureWebhookBody(step: chain.step, error: error, history: history),
                     attempt: 1, id: message.id)
    }

    // MARK: Batch steps

    /// A chain step that is a batch: created like any batch (id `<chain id>:<step>`), with the
    /// step's message as its continuation; its end advances the chain.
    private func chainBatchStep(_ run: Run, _ message: ChainMessage, step: Int, batch: BatchMessage) {
        guard self.isActive(run) else { return }
        guard case .create(var manifest) = batch.kind else { return self.requeue(run, "a batch step must be a batch") }
        manifest.queue = message.queue ?? run.queue.name
        let launched = BatchMessage(kind: .create(manifest), children: batch.children)
        switch self.batchState(batch.batchId) {
        case .unknown(let error):
            return self.requeue(run, "could not read the state of batch \(batch.batchId): \(error)")
        case .open(nil) where run.parkedCount < 3:
            // Its queues exist but no checkpoint could be read (being created, or read back by
            // another bridge this moment): whose batch it is cannot be told now; it waits a little.
            return self.park(run, reason: "batch \(batch.batchId)'s checkpoint could not be read yet")
        case .open(let existing?) where existing.manifest.continuation == nil:
            // Someone else's batch has this step's id: the step cannot run as itself.
            let reason = "batch id '\(batch.batchId.prefix(80))' is in use by a batch that is not this chain's step"
            let chain = ChainRun(message: message, step: step, startedAt: Self.unixMilliseconds(), home: message.queue ?? run.queue.name)
            run.chain = chain
            return self.deadLetter(run, reason: "malformed", error: reason, status: nil, taskId: "\(message.id):\(step)") { [unowned self] in
                self.chainStepFailed(run, chain, .malformed(taskId: "\(message.id):\(step)", queue: run.queue.name, reason))
            }
        default:
            break
        }
        self.launchBatch(run, launched, join: manifest.join, creator: Self.creator(of: run), continuation: message)
    }

    /// A child of a chain's batch step: its callback gets the chain's envelope around its payload.
    static func chainChildBody(_ child: BatchChild, chain: ChainMessage, step: Int) -> [UInt8] {
        let spec = child.spec
        let (seconds, attoseconds) = spec.timeout.components
        var out = Array("{\"callbackUrl\":\(JSONScan.quote(spec.callbackURL)),\"retries\":\(spec.retries),\"timeout\":\(Double(seconds) + Double(attoseconds) / 1e18)".utf8)
        if let url = spec.webhookURL { out += Array(",\"webhookUrl\":\(JSONScan.quote(url))".utf8) }
        if let url = spec.failureWebhookURL { out += Array(",\"failureWebhookUrl\":\(JSONScan.quote(url))".utf8) }
        out += Array(",\"payload\":".utf8) + chain.callbackBody(step: step, child: (child.index, spec.payload)) + [UInt8(ascii: "}")]
        return out
    }

    /// A chain's batch step ended (`report` is its aggregated outcome): completed, the chain goes
    /// on with the report as the step's result; failed or expired, the chain fails there — the
    /// step's message is dead-lettered (publish it back to run the batch step again) and the
    /// failure webhook sent. `then` runs once all of it is confirmed.
    func chainBatchStepEnded(_ continuation: [UInt8], status: BatchStatus, report: [UInt8], createdAt: Int64,
                             _ then: @escaping (Result<Void, AMQPError>) -> Void) {
        // The bridge's own words, checked when the chain was created: read without today's limits.
        let lenient = TaskDefaults(retries: 3, timeout: .seconds(30), maxTimeout: .seconds(30 * 86_400), maxPayloadBytes: Int.max)
        guard case .success(let message) = ChainParser.parse(continuation, messageId: nil, defaults: lenient, isWorkQueue: { _ in true }),
              let step = message.step else {
            self.logger.warning("a chain's batch step carried an unreadable continuation; the chain stops there")
            return then(.success(()))
        }
        let home = message.queue ?? "default"
        let chain = ChainRun(message: message, step: step, startedAt: createdAt, home: home)
        let entry = message.historyEntry(step: step, attempts: 1, completed: status == .completed, startedAt: createdAt, endedAt: Self.unixMilliseconds())
        var outstanding = 1
        var failure: AMQPError?
        let done: (Result<Void, AMQPError>) -> Void = { result in
            if case .failure(let error) = result, failure == nil { failure = error }
            outstanding -= 1
            guard outstanding == 0 else { return }
            then(failure.map { .failure($0) } ?? .success(()))
        }
        if status == .completed {
            let history = message.history + [entry]
            let results = message.results + [report[...]]
            if let url = message.stepWebhookURL {
                outstanding += 1
                self.chainWebhook(chain, url: url, id: "\(message.id):\(step):result", body: message.stepWebhookBody(step: step, result: report), done)
            }
            if step < message.steps.count {
                outstanding += 1
                self.publishStep(message, step: step + 1, history: history, results: results) { [unowned self] result in
                    guard case .failure(let error) = result, error.code == .invalidArgument else { return done(result) }
                    // The chain cannot go on as it is (its context outgrew the limit): it fails here.
                    self.chainBatchStepEnded(continuation, status: .failed, report: Array("{\"error\":\(JSONScan.quote(error.message))}".utf8),
                                             createdAt: createdAt, done)
                }
            } else {
                self.count(.chainsCompleted)
                self.emit(.chainCompleted, queue: home, taskId: message.id, fields: ",\"chainId\":\(JSONScan.quote(message.id)),\"steps\":\(message.steps.count)")
                if let url = message.webhookURL {
                    outstanding += 1
                    self.chainWebhook(chain, url: url, id: message.id, body: message.finalWebhookBody(result: report, history: history), done)
                }
            }
            return done(.success(()))
        }
        // Failed or expired: the chain fails at this step.
        self.count(.chainsFailed)
        self.emit(.chainFailed, queue: home, taskId: message.id, fields: ",\"chainId\":\(JSONScan.quote(message.id)),\"failedStep\":\(step)")
        let reason = "batch-\(status.rawValue)"
        outstanding += 1
        let headers: AMQPTable = [
            "aq-reason": .string(reason), "aq-error": .string("the batch of step \(step) ended \(status.rawValue)"),
            "aq-task-id": .string("\(message.id):\(step)"), "aq-queue": .string(home), "aq-attempts": .int32(1),
            "aq-dead-lettered-at": .timestamp(UInt64(Date().timeIntervalSince1970)),
        ]
        self.publish(exchange: self.settings.spec.deadLetterExchange, routingKey: self.settings.spec.queueName(forWorkQueue: home),
                     properties: AMQPProperties(contentType: "application/json", headers: headers, deliveryMode: .persistent,
                                                messageId: "\(message.id):\(step)", userId: self.settings.bridgeUser),
                     body: continuation, done)
        if let url = message.failureWebhookURL ?? message.webhookURL {
            outstanding += 1
            let error = "{\"reason\":\(JSONScan.quote(reason)),\"message\":\(JSONScan.quote("the batch of step \(step) ended \(status.rawValue)")),\"status\":null,\"batch\":\(String(decoding: report, as: UTF8.self))}"
            self.chainWebhook(chain, url: url, id: message.id, body: message.failureWebhookBody(step: step, error: error, history: message.history + [entry]), done)
        }
        done(.success(()))
    }
}
