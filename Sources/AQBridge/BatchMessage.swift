import Foundation

// Fan-out / fan-in on the wire (issue 9). A batch is created by one message published like a
// task (to `aq.tasks`, routing key = the work queue its children run on by default):
//
//     {"batch": {"id": "portfolio-42", "webhookUrl": "https://app/api/on-portfolio-done",
//                "join": "allSettled", "deadline": 600},
//      "tasks": [{"callbackUrl": "...", "payload": {...}}, ...]}
//
// A batch too big for one message opens with `batch.size` (the number of children in all) and
// carries the first children in `tasks`; the rest follow in parts, each naming the index of its
// first child:
//
//     {"batchPart": {"id": "portfolio-42", "offset": 10000}, "tasks": [...]}
//
// Child `i` gets the task id `<batch id>:<i>` (a child that runs twice counts once).

/// How a batch decides it is over.
public enum BatchJoin: String, Sendable, Codable, Equatable {
    /// Wait for every child; report each (the default).
    case allSettled
    /// Fail fast: the batch fails at the first child that fails for good.
    case all
}

/// What the aggregator needs to know of a batch, from its creating message.
public struct BatchManifest: Sendable, Codable, Equatable {
    public var id: String
    /// Children in all.
    public var size: Int
    public var join: BatchJoin
    public var webhookURL: String?
    public var failureWebhookURL: String?
    /// When the batch expires, in Unix milliseconds (nil: no deadline).
    public var deadline: Int64?
    /// When the batch was created, in Unix milliseconds.
    public var createdAt: Int64
    /// The work queue the batch was created on: its timer returns there.
    public var queue: String
    /// The AMQP user that created it (its `user_id`, which the broker checks): only that user's
    /// parts and re-creates are taken (nil: the creator sent none, so nobody can be told apart).
    public var creator: String?
    /// For a batch that is a chain's step: that step's message, which its end advances.
    public var continuation: Data?

    public init(id: String, size: Int, join: BatchJoin = .allSettled, webhookURL: String? = nil, failureWebhookURL: String? = nil,
                deadline: Int64? = nil, createdAt: Int64, queue: String) {
        self.id = id
        self.size = size
        self.join = join
        self.webhookURL = webhookURL
        self.failureWebhookURL = failureWebhookURL
        self.deadline = deadline
        self.createdAt = createdAt
        self.queue = queue
    }
}

/// One child of a batch, checked like any task.
public struct BatchChild: Sendable {
    public var index: Int
    /// The child's JSON object as published: it becomes the child task's body.
    public var body: [UInt8]
    /// The work queue it runs on (nil: the batch's own).
    public var queue: String?
    public var spec: TaskSpec
}

/// A batch-creating message, read.
public struct BatchMessage: Sendable {
    public enum Kind: Sendable, Equatable {
        /// The message that opens the batch (and, for a batch that fits one message, all of it).
        case create(BatchManifest)
        /// More children of a batch opened with `size`.
        case part(batchId: String, offset: Int)
    }

    public var kind: Kind
    public var children: [BatchChild]

    public var batchId: String {
        switch self.kind {
        case .create(let manifest): manifest.id
        case .part(let id, _): id
        }
    }
}

/// Why a batch message is refused. The whole message is dead-lettered with this reason and none
/// of its children runs; `notify` is the batch's webhook when it could be read. For a part, the
/// children it should have carried (`part`) are reported to the batch as failed, so the batch
/// still ends.
public struct MalformedBatch: Error, Sendable, Equatable, CustomStringConvertible {
    public var reason: String
    public var notify: String?
    public var part: (batchId: String, offset: Int, count: Int)?
    public var description: String { self.reason }

    public static func == (a: Self, b: Self) -> Bool {
        a.reason == b.reason && a.notify == b.notify && a.part?.batchId == b.part?.batchId
            && a.part?.offset == b.part?.offset && a.part?.count == b.part?.count
    }
}

public enum BatchParser {
    /// Children in one message at most (a bigger batch comes in parts).
    public static let maxChildrenPerMessage = 10_000
    /// Children in one batch at most.
    public static let maxSize = 1_000_000
    /// A batch id leaves room for `:<index>` in a task id.
    public static let maxIdBytes = TaskParser.maxIdBytes - 8
    /// The longest deadline: 30 days, like a task's delay.
    public static let maxDeadline = TaskParser.maxDelay

    static let batchKeys: Set<String> = ["id", "webhookUrl", "failureWebhookUrl", "join", "deadline", "size"]
    static let partKeys: Set<String> = ["id", "offset"]

    /// True when a message body is a batch message (it has a top-level `batch` or `batchPart`):
    /// what the task parser's one pass tells the engine.
    public static let markerKeys: [StaticString] = ["batch", "batchPart"]

    /// Reads and checks a batch message received on work queue `queue`. `messageId` names the
    /// batch when the body does not; `isWorkQueue` tells whether a child's `queue` exists.
    public static func parse(_ body: [UInt8], messageId: String?, queue: String, defaults: TaskDefaults,
                             isWorkQueue: (String) -> Bool, now: Date = Date()) -> Result<BatchMessage, MalformedBatch> {
        let top: [String: JSONScan.Member]
        do { top = try JSONScan.members(body) } catch {
            return .failure(MalformedBatch(reason: "the body is not a JSON object: \(error)"))
        }
        if let unknown = top.keys.sorted().first(where: { !["batch", "batchPart", "tasks"].contains($0) }) {
            return .failure(MalformedBatch(reason: "unknown key '\(unknown.prefix(64))' in a batch message (batch, batchPart and tasks are allowed)"))
        }
        func object(_ member: JSONScan.Member) -> [UInt8] { Array(body[member.range]) }
        switch (top["batch"], top["batchPart"]) {
        case (nil, nil): return .failure(MalformedBatch(reason: "neither batch nor batchPart is given"))
        case (.some, .some): return .failure(MalformedBatch(reason: "give batch or batchPart, not both"))
        case (let batch?, nil):
            guard batch.kind == .object else { return .failure(MalformedBatch(reason: "batch must be an object")) }
            return self.parseCreate(object(batch), tasks: top["tasks"], body: body, messageId: messageId, queue: queue,
                                    defaults: defaults, isWorkQueue: isWorkQueue, now: now)
        case (nil, let part?):
            guard part.kind == .object else { return .failure(MalformedBatch(reason: "batchPart must be an object")) }
            return self.parsePart(object(part), tasks: top["tasks"], body: body, defaults: defaults, isWorkQueue: isWorkQueue, now: now)
        }
    }

    private static func string(_ bytes: [UInt8], _ member: JSONScan.Member?, _ key: String) -> Result<String?, MalformedBatch> {
        guard let member, member.kind != .null else { return .success(nil) }
        guard member.kind == .string, let text = try? JSONScan.decodeString(bytes, member.range) else {
            return .failure(MalformedBatch(reason: "\(key) must be a string"))
        }
        return .success(text)
    }

    private static func batchId(_ id: String?) -> String? {
        guard let id = TaskParser.safeId(id), id.utf8.count <= Self.maxIdBytes else { return nil }
        return id
    }

    private static func parseCreate(_ options: [UInt8], tasks: JSONScan.Member?, body: [UInt8], messageId: String?, queue: String,
                                    defaults: TaskDefaults, isWorkQueue: (String) -> Bool, now: Date) -> Result<BatchMessage, MalformedBatch> {
        guard let members = try? JSONScan.members(options) else { return .failure(MalformedBatch(reason: "batch is not a valid object")) }
        // Where a failure is told, read first: a batch malformed elsewhere is still reported.
        var notify: String?
        for key in ["failureWebhookUrl", "webhookUrl"] where notify == nil {
            if case .success(let url?) = self.string(options, members[key], key), TaskParser.urlProblem(url) == nil { notify = url }
        }
        func bad(_ reason: String) -> Result<BatchMessage, MalformedBatch> { .failure(MalformedBatch(reason: reason, notify: notify)) }
        if let unknown = members.keys.sorted().first(where: { !Self.batchKeys.contains($0) }) {
            return bad("unknown batch option '\(unknown.prefix(64))' (known: \(Self.batchKeys.sorted().joined(separator: ", ")))")
        }
        var urls: [String: String] = [:]
        for key in ["webhookUrl", "failureWebhookUrl"] {
            switch self.string(options, members[key], "batch.\(key)") {
            case .failure(let error): return bad(error.reason)
            case .success(nil): break
            case .success(let url?):
                if let problem = TaskParser.urlProblem(url) { return bad("batch.\(key) \(problem)") }
                urls[key] = url
            }
        }
        var id: String?
        switch self.string(options, members["id"], "batch.id") {
        case .failure(let error): return bad(error.reason)
        case .success(let text): id = text ?? (messageId?.isEmpty == false ? messageId : nil)
        }
        if id == nil { id = UUID().uuidString.lowercased() }
        guard let id = self.batchId(id) else {
            return bad("the batch id must be at most \(Self.maxIdBytes) bytes without control characters")
        }
        var join = BatchJoin.allSettled
        switch self.string(options, members["join"], "batch.join") {
        case .failure(let error): return bad(error.reason)
        case .success(nil): break
        case .success(let text?):
            guard let value = BatchJoin(rawValue: text) else { return bad("batch.join must be allSettled or all, not '\(text.prefix(40))'") }
            join = value
        }
        let nowMilliseconds = Int64(now.timeIntervalSince1970 * 1000)
        var deadline: Int64?
        if let member = members["deadline"], member.kind != .null {
            let text = String(decoding: options[member.range], as: UTF8.self)
            let limit = Double(Self.maxDeadline.components.seconds)
            guard member.kind == .number, let seconds = Double(text), seconds.isFinite, seconds > 0, seconds <= limit else {
                return bad("batch.deadline must be a positive number of seconds up to \(Int(limit)) (30 days), not \(text.prefix(40))")
            }
            deadline = nowMilliseconds + Int64((seconds * 1000).rounded())
        }
        var children: [BatchChild] = []
        if let tasks {
            switch self.children(body, tasks, batchId: id, offset: 0, defaults: defaults, isWorkQueue: isWorkQueue, now: now) {
            case .failure(let problem): return bad(problem.reason)
            case .success(let list): children = list
            }
        }
        var size = children.count
        if let member = members["size"], member.kind != .null {
            guard let value = JSONScan.integer(options, member, in: 1...Self.maxSize) else {
                return bad("batch.size must be a whole number from 1 to \(Self.maxSize)")
            }
            guard value >= children.count else { return bad("batch.size is \(value) but tasks holds \(children.count) children") }
            size = value
        }
        guard size > 0 else { return bad("a batch needs at least one child in tasks (or batch.size and parts)") }
        let manifest = BatchManifest(id: id, size: size, join: join, webhookURL: urls["webhookUrl"], failureWebhookURL: urls["failureWebhookUrl"],
                                     deadline: deadline, createdAt: nowMilliseconds, queue: queue)
        return .success(BatchMessage(kind: .create(manifest), children: children))
    }

    private static func parsePart(_ options: [UInt8], tasks: JSONScan.Member?, body: [UInt8], defaults: TaskDefaults,
                                  isWorkQueue: (String) -> Bool, now: Date) -> Result<BatchMessage, MalformedBatch> {
        guard let members = try? JSONScan.members(options) else { return .failure(MalformedBatch(reason: "batchPart is not a valid object")) }
        if let unknown = members.keys.sorted().first(where: { !Self.partKeys.contains($0) }) {
            return .failure(MalformedBatch(reason: "unknown batchPart option '\(unknown.prefix(64))' (known: id, offset)"))
        }
        guard case .success(let text?) = self.string(options, members["id"], "batchPart.id"), let id = self.batchId(text) else {
            return .failure(MalformedBatch(reason: "batchPart.id must name the batch (at most \(Self.maxIdBytes) bytes)"))
        }
        guard let offset = JSONScan.integer(options, members["offset"], in: 0...(Self.maxSize - 1)) else {
            return .failure(MalformedBatch(reason: "batchPart.offset must be the index of its first child, from 0 to \(Self.maxSize - 1)"))
        }
        // The children a refused part should have carried still end, as failed.
        var count = 0
        if let tasks, tasks.kind == .array {
            try? JSONScan.forEachElement(Array(body[tasks.range])) { _ in count += 1 }
        }
        count = min(count, Self.maxSize - offset, Self.maxChildrenPerMessage)
        func bad(_ reason: String) -> Result<BatchMessage, MalformedBatch> {
            .failure(MalformedBatch(reason: reason, part: (id, offset, count)))
        }
        guard let tasks else { return bad("batchPart needs tasks") }
        switch self.children(body, tasks, batchId: id, offset: offset, defaults: defaults, isWorkQueue: isWorkQueue, now: now) {
        case .failure(let problem): return bad(problem.reason)
        case .success(let list):
            guard !list.isEmpty else { return bad("batchPart needs at least one child in tasks") }
            return .success(BatchMessage(kind: .part(batchId: id, offset: offset), children: list))
        }
    }

    /// The children in `tasks`, each checked as a task; the first problem refuses them all.
    struct ChildProblem: Error {
        var reason: String
        init(_ reason: String) { self.reason = reason }
    }

    private static func children(_ body: [UInt8], _ tasks: JSONScan.Member, batchId: String, offset: Int, defaults: TaskDefaults,
                                 isWorkQueue: (String) -> Bool, now: Date) -> Result<[BatchChild], ChildProblem> {
        guard tasks.kind == .array else { return .failure(ChildProblem("tasks must be an array of task objects")) }
        let list = Array(body[tasks.range])
        var elements: [JSONScan.Member] = []
        do {
            try JSONScan.forEachElement(list) { (member: JSONScan.Member) throws(JSONScan.Failure) in
                elements.append(member)
                if elements.count > Self.maxChildrenPerMessage { throw JSONScan.Failure(offset: member.range.lowerBound, reason: "too many") }
            }
        } catch {
            if elements.count > Self.maxChildrenPerMessage {
                return .failure(ChildProblem("tasks holds more than \(Self.maxChildrenPerMessage) children: send the rest in batchPart messages"))
            }
            return .failure(ChildProblem("tasks is not a valid array: \(error)"))
        }
        guard offset + elements.count <= Self.maxSize else { return .failure(ChildProblem("the batch would hold more than \(Self.maxSize) children")) }
        var children: [BatchChild] = []
        children.reserveCapacity(elements.count)
        for (position, element) in elements.enumerated() {
            let index = offset + position
            guard element.kind == .object else { return .failure(ChildProblem("tasks[\(position)] must be an object")) }
            let child = Array(list[element.range])
            guard let members = try? JSONScan.members(child) else { return .failure(ChildProblem("tasks[\(position)] is not a valid object")) }
            if members["taskId"] != nil { return .failure(ChildProblem("tasks[\(position)]: a child's id is <batch id>:<index>; taskId is not allowed")) }
            var queue: String?
            switch self.string(child, members["queue"], "tasks[\(position)].queue") {
            case .failure(let error): return .failure(ChildProblem(error.reason))
            case .success(let name):
                if let name, !isWorkQueue(name) { return .failure(ChildProblem("tasks[\(position)].queue names no work queue: '\(name.prefix(64))'")) }
                queue = name
            }
            switch TaskParser.parse(child, messageId: "\(batchId):\(index)", defaults: defaults, now: now) {
            case .failure(let error): return .failure(ChildProblem("tasks[\(position)]: \(error.reason)"))
            case .success(let spec): children.append(BatchChild(index: index, body: child, queue: queue, spec: spec))
            }
        }
        return .success(children)
    }
}
