import Foundation

// Chaining on the wire (issue 10). A chain is created by one message published like a task:
//
//     {"chain": {"id": "order-7", "webhookUrl": "...", "failureWebhookUrl": "...", "stepWebhookUrl": "..."},
//      "payload": {...},
//      "steps": [{"callbackUrl": "...", "retries": 2, "timeout": 30, "queue": "reports"}, ...]}
//
// The bridge turns it into step messages, each carrying the whole context — the chain's options,
// payload and steps, which step is next, and what the earlier steps did — routed on `aq.chain`
// by `<work queue>.<chain id>.<step>`. A step message is also the way to resume: a failed step's
// dead letter, published back, runs that step again with the earlier results intact.

/// A chain message, read: a create (no `step`) or a step (`step` = 1-based number to run).
public struct ChainMessage: Sendable {
    public var id: String
    public var webhookURL: String?
    public var failureWebhookURL: String?
    public var stepWebhookURL: String?
    /// The work queue the chain was created on (its steps run there unless they name their own).
    public var queue: String?
    /// The raw JSON of the payload and steps, re-emitted verbatim in the next step's message.
    public var payload: ArraySlice<UInt8>
    public var steps: [ArraySlice<UInt8>]
    /// The step to run (1-based); nil for a create.
    public var step: Int?
    /// Per finished step: `{"step","taskId","attempts","status","startedAt","endedAt"}`.
    public var history: [ArraySlice<UInt8>]
    /// The finished steps' results, in order.
    public var results: [ArraySlice<UInt8>]
    /// Each step's work queue (nil: the chain's own).
    public var queues: [String?]
    /// Each step as a task, or nil for a batch step (see `batches`).
    public var specs: [TaskSpec?]
    /// Each batch step (a step written `{"batch": {...}, "tasks": [...]}`), or nil.
    public var batches: [BatchMessage?]

    /// The body a step's callback receives: the chain id, the step number (1-based), the chain's
    /// payload and the previous step's result (null for the first).
    /// A batch step's child gets its `index` and its own `payload` in the same envelope.
    public func callbackBody(step: Int, child: (index: Int, payload: ArraySlice<UInt8>)? = nil) -> [UInt8] {
        let payload = child?.payload ?? self.payload
        let previous = self.results.last ?? Array("null".utf8)[...]
        var out: [UInt8] = []
        out.reserveCapacity(self.id.utf8.count + payload.count + previous.count + 96)
        out += "{\"chainId\":".utf8
        JSONScan.appendQuoted(self.id, to: &out)
        out += ",\"step\":\(step)".utf8
        if let child { out += ",\"index\":\(child.index)".utf8 }
        out += ",\"payload\":".utf8
        out += payload
        out += ",\"previousResult\":".utf8
        out += previous
        out.append(UInt8(ascii: "}"))
        return out
    }

    /// A finished step's record, as the final and failure webhooks list it (times in Unix ms).
    public func historyEntry(step: Int, attempts: Int, completed: Bool, startedAt: Int64, endedAt: Int64) -> ArraySlice<UInt8> {
        var out: [UInt8] = []
        out.reserveCapacity(self.id.utf8.count + 128)
        out += "{\"step\":".utf8
        out += String(step).utf8
        out += ",\"taskId\":".utf8
        JSONScan.appendQuoted(self.id, to: &out)
        out.removeLast()  // the task id is "<chain id>:<step>": the closing quote comes after the step
        out.append(UInt8(ascii: ":"))
        out += String(step).utf8
        out += "\",\"attempts\":".utf8
        out += String(attempts).utf8
        out += completed ? ",\"status\":\"completed\",\"startedAt\":".utf8 : ",\"status\":\"failed\",\"startedAt\":".utf8
        out += String(startedAt).utf8
        out += ",\"endedAt\":".utf8
        out += String(endedAt).utf8
        out.append(UInt8(ascii: "}"))
        return out[...]
    }

    /// What `stepWebhookUrl` gets after a step.
    public func stepWebhookBody(step: Int, result: some Collection<UInt8>) -> [UInt8] {
        Array("{\"chainId\":\(JSONScan.quote(self.id)),\"step\":\(step),\"taskId\":\(JSONScan.quote("\(self.id):\(step)")),\"status\":\"completed\",\"result\":".utf8)
            + result + [UInt8(ascii: "}")]
    }

    /// What `webhookUrl` gets after the last step.
    public func finalWebhookBody(result: some Collection<UInt8>, history: [ArraySlice<UInt8>]) -> [UInt8] {
        Array("{\"chainId\":\(JSONScan.quote(self.id)),\"status\":\"completed\",\"result\":".utf8) + result
            + Array(",\"steps\":".utf8) + Self.list(history) + [UInt8(ascii: "}")]
    }

    /// What `failureWebhookUrl` (else `webhookUrl`) gets when step `step` fails for good; `error`
    /// is a JSON object.
    public func failureWebhookBody(step: Int, error: String, history: [ArraySlice<UInt8>]) -> [UInt8] {
        Array("{\"chainId\":\(JSONScan.quote(self.id)),\"status\":\"failed\",\"failedStep\":\(step),\"error\":\(error),\"results\":".utf8)
            + Self.list(self.results) + Array(",\"steps\":".utf8) + Self.list(history) + [UInt8(ascii: "}")]
    }

    /// A JSON array of JSON values.
    static func list(_ items: [ArraySlice<UInt8>]) -> [UInt8] {
        var out: [UInt8] = []
        out.reserveCapacity(Self.listBytes(items))
        Self.appendList(items, to: &out)
        return out
    }

    static func listBytes(_ items: [ArraySlice<UInt8>]) -> Int { items.reduce(2) { $0 + $1.count + 1 } }

    static func appendList(_ items: [ArraySlice<UInt8>], to out: inout [UInt8]) {
        out.append(UInt8(ascii: "["))
        for (i, item) in items.enumerated() {
            if i > 0 { out.append(UInt8(ascii: ",")) }
            out += item
        }
        out.append(UInt8(ascii: "]"))
    }

    /// The message for step `step` after the earlier ones did `history` and gave `results`.
    public func stepMessage(step: Int, history: [ArraySlice<UInt8>], results: [ArraySlice<UInt8>]) -> [UInt8] {
        var out: [UInt8] = []
        let urls = [("webhookUrl", self.webhookURL), ("failureWebhookUrl", self.failureWebhookURL), ("stepWebhookUrl", self.stepWebhookURL)]
        out.reserveCapacity(160 + self.id.utf8.count + urls.reduce(0) { $0 + ($1.1?.utf8.count ?? 0) } + (self.queue?.utf8.count ?? 0)
                            + self.payload.count + Self.listBytes(self.steps) + Self.listBytes(history) + Self.listBytes(results))
        out += "{\"chain\":{\"id\":".utf8
        JSONScan.appendQuoted(self.id, to: &out)
        for (key, url) in urls {
            if let url {
                out += ",\"".utf8
                out += key.utf8
                out += "\":".utf8
                JSONScan.appendQuoted(url, to: &out)
            }
        }
        if let queue = self.queue {
            out += ",\"queue\":".utf8
            JSONScan.appendQuoted(queue, to: &out)
        }
        out += "},\"payload\":".utf8
        out += self.payload
        out += ",\"steps\":".utf8
        Self.appendList(self.steps, to: &out)
        out += ",\"step\":\(step),\"history\":".utf8
        Self.appendList(history, to: &out)
        out += ",\"results\":".utf8
        Self.appendList(results, to: &out)
        out.append(UInt8(ascii: "}"))
        return out
    }
}

public enum ChainParser {
    public static let maxSteps = 100
    /// A chain id leaves room for `:<step>` in a batch step's id (itself at most 192 bytes).
    public static let maxIdBytes = BatchParser.maxIdBytes - 4

    static let optionKeys: [StaticString] = ["id", "webhookUrl", "failureWebhookUrl", "stepWebhookUrl", "queue"]
    static let topKeys: [StaticString] = ["chain", "payload", "steps", "step", "history", "results"]
    static let stepKeysRefused: [StaticString] = ["payload", "taskId", "webhookUrl", "failureWebhookUrl", "batch", "batchPart", "chain"]

    /// Reads and checks a chain message received on work queue `queue`.
    ///
    /// Every step message comes through here, so it reads the body in place: one pass checks the
    /// whole document, then the parts it needs are found by range (no copies, no dictionaries).
    public static func parse(_ body: [UInt8], messageId: String?, defaults: TaskDefaults, isWorkQueue: (String) -> Bool,
                             now: Date = Date()) -> Result<ChainMessage, MalformedTask> {
        let top: JSONScan.Fields
        do { top = try JSONScan.Fields(body) } catch {
            return .failure(MalformedTask(reason: "the body is not a JSON object: \(error)"))
        }
        guard let chain = top["chain"], chain.kind == .object else { return .failure(MalformedTask(reason: "chain must be an object")) }
        guard let options = try? JSONScan.Fields(body, in: chain.range, validated: true) else { return .failure(MalformedTask(reason: "chain is not a valid object")) }
        var notify: String?
        var webhookURL: String?, failureWebhookURL: String?, stepWebhookURL: String?
        for key: StaticString in ["failureWebhookUrl", "webhookUrl", "stepWebhookUrl"] {
            guard let member = options[key], member.kind != .null else { continue }
            guard let url = options.string(member) else { return .failure(MalformedTask(reason: "chain.\(key) must be a string", notify: notify)) }
            if let problem = TaskParser.urlProblem(url) { return .failure(MalformedTask(reason: "chain.\(key) \(problem)", notify: notify)) }
            switch key.description {
            case "failureWebhookUrl": failureWebhookURL = url
            case "webhookUrl": webhookURL = url
            default: stepWebhookURL = url
            }
            if notify == nil, key.description != "stepWebhookUrl" { notify = url }
        }
        func bad(_ reason: String) -> Result<ChainMessage, MalformedTask> { .failure(MalformedTask(reason: reason, notify: notify)) }
        if let unknown = top.firstUnknownKey(Self.topKeys) {
            return bad("unknown key '\(unknown.prefix(64))' in a chain message (chain, payload, steps are allowed)")
        }
        if let unknown = options.firstUnknownKey(Self.optionKeys) {
            return bad("unknown chain option '\(unknown.prefix(64))' (known: failureWebhookUrl, id, queue, stepWebhookUrl, webhookUrl)")
        }
        var home: String?
        if let member = options["queue"], member.kind != .null {
            guard let name = options.string(member), isWorkQueue(name) else { return bad("chain.queue must name a work queue") }
            home = name
        }
        var id: String? = messageId.flatMap { $0.isEmpty ? nil : $0 }
        let idMember = options["id"]
        if let member = idMember, member.kind != .null {
            guard let text = options.string(member) else { return bad("chain.id must be a string") }
            id = text
        }
        if top["step"] != nil, let messageId, let colon = messageId.lastIndex(of: ":"), idMember == nil {
            id = String(messageId[..<colon])  // a step published back without chain.id: its message id is <chain id>:<step>
        }
        // No '.', '*' or '#': the id is one word of the step's routing key on the topic exchange.
        guard let id = TaskParser.safeId(id ?? UUID().uuidString.lowercased()), id.utf8.count <= Self.maxIdBytes,
              !id.utf8.contains(where: { $0 == UInt8(ascii: ".") || $0 == UInt8(ascii: "*") || $0 == UInt8(ascii: "#") }) else {
            return bad("the chain id must be at most \(Self.maxIdBytes) bytes without control characters, '.', '*' or '#'")
        }
        guard let stepsMember = top["steps"], stepsMember.kind == .array else { return bad("steps must be an array of step objects") }
        var steps: [JSONScan.Member] = []
        do {
            try JSONScan.forEachElement(body, in: stepsMember.range, validated: true) { (member: JSONScan.Member) throws(JSONScan.Failure) in steps.append(member) }
        } catch {
            return bad("steps is not a valid array: \(error)")
        }
        guard (1...Self.maxSteps).contains(steps.count) else { return bad("a chain has 1 to \(Self.maxSteps) steps, not \(steps.count)") }
        var specs: [TaskSpec?] = []
        var batches: [BatchMessage?] = []
        var queues: [String?] = []
        specs.reserveCapacity(steps.count)
        batches.reserveCapacity(steps.count)
        queues.reserveCapacity(steps.count)
        var current: Int?
        if let member = top["step"] {
            guard let value = JSONScan.integer(body, member, in: 1...steps.count) else { return bad("step must be a step number from 1 to \(steps.count)") }
            current = value
        }
        for (i, step) in steps.enumerated() {
            // A create checks every step; a step message checks the step it runs (the others
            // were checked at the create; one published back by hand is checked when it runs)
            // and reads the next one's queue.
            if let current, i != current - 1 {
                if i == current, step.kind == .object, let object = try? JSONScan.Fields(body, in: step.range, validated: true),
                   let member = object["queue"], let name = object.string(member) {
                    queues.append(isWorkQueue(name) ? name : nil)
                } else {
                    queues.append(nil)
                }
                specs.append(nil)
                batches.append(nil)
                continue
            }
            guard step.kind == .object, let object = try? JSONScan.Fields(body, in: step.range, validated: true) else { return bad("steps[\(i)] must be an object") }
            if object["batch"] != nil {
                // A step that fans out: a batch (its own join and deadline; no webhooks of its own).
                let batchOptions = object["batch"].flatMap { try? JSONScan.Fields(body, in: $0.range) }
                if let batchOptions, batchOptions["webhookUrl"] != nil || batchOptions["failureWebhookUrl"] != nil || batchOptions["size"] != nil || batchOptions["id"] != nil {
                    return bad("steps[\(i)]: a batch step takes join and deadline only (the chain reports it)")
                }
                switch BatchParser.parse(Array(body[step.range]), messageId: "\(id):\(i + 1)", queue: home ?? "default", defaults: defaults,
                                         isWorkQueue: isWorkQueue, now: now) {
                case .failure(let error): return bad("steps[\(i)]: \(error.reason)")
                case .success(let batch): batches.append(batch)
                }
                specs.append(nil)
                queues.append(nil)
                continue
            }
            for key in Self.stepKeysRefused where object[key] != nil {
                return bad("steps[\(i)]: '\(key)' is not allowed in a step (the chain gives its payload and webhooks)")
            }
            var queue: String?
            if let member = object["queue"], member.kind != .null {
                guard let name = object.string(member), isWorkQueue(name) else { return bad("steps[\(i)].queue must name a work queue") }
                queue = name
            }
            switch TaskParser.parse(body, in: step.range, validated: true, messageId: "\(id):\(i + 1)", defaults: defaults, now: now) {
            case .failure(let error): return bad("steps[\(i)]: \(error.reason)")
            case .success(let spec): specs.append(spec)
            }
            batches.append(nil)
            queues.append(queue)
        }
        let step = current
        func list(_ member: JSONScan.Member?, _ key: String) -> Result<[ArraySlice<UInt8>], MalformedTask> {
            guard let member, member.kind != .null else { return .success([]) }
            guard member.kind == .array else { return .failure(MalformedTask(reason: "\(key) must be an array", notify: notify)) }
            var items: [ArraySlice<UInt8>] = []
            items.reserveCapacity(steps.count)
            try? JSONScan.forEachElement(body, in: member.range, validated: true) { (element: JSONScan.Member) throws(JSONScan.Failure) in
                items.append(body[element.range])
            }
            return .success(items)
        }
        let historyMember = top["history"], resultsMember = top["results"]
        let history: [ArraySlice<UInt8>], results: [ArraySlice<UInt8>]
        switch (list(historyMember, "history"), list(resultsMember, "results")) {
        case (.failure(let error), _), (_, .failure(let error)): return .failure(error)
        case (.success(let h), .success(let r)): (history, results) = (h, r)
        }
        if let step, results.count != step - 1 || history.count != step - 1 {
            return bad("step \(step) needs the \(step - 1) earlier steps' history and results")
        }
        if step == nil, historyMember != nil || resultsMember != nil { return bad("history and results come with step") }
        let payload = top["payload"].map { body[$0.range] } ?? Array("null".utf8)[...]
        return .success(ChainMessage(id: id, webhookURL: webhookURL, failureWebhookURL: failureWebhookURL,
                                     stepWebhookURL: stepWebhookURL, queue: home, payload: payload,
                                     steps: steps.map { body[$0.range] }, step: step, history: history, results: results,
                                     queues: queues, specs: specs, batches: batches))
    }
}
