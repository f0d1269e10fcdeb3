import Foundation

// Fan-in (issue 9): the rules of one batch's aggregation, as a pure state machine that returns
// actions for the engine to carry out. The broker holds the state, in three queues per batch:
//
// - `aq.batch.<id>.replies` — the reply queue: each child's final outcome, published (confirmed) before
//   the child is acked, and the deadline's mark. Classic, durable, single active consumer: the
//   bridge consuming it is the batch's one aggregator; the others wait behind it.
// - `aq.batch.<id>.state` — the checkpoint: the manifest, which children have settled, how many
//   result segments were written. Read with basic.get when an aggregator takes over; never
//   consumed, so no delivery is held past the broker's consumer_timeout.
// - `aq.batch.<id>.results` — result segments (JSON arrays of child outcomes), written as the
//   outcomes are folded and read once, when the batch ends, to build its webhook.
//
// Folding: outcomes gather in memory until `Policy` says to persist (count, bytes or age);
// then the engine writes the segment and the new checkpoint (both confirmed), removes the old
// checkpoint and acks the folded outcomes. A crash at any point leaves either the old checkpoint
// with the outcomes still in the reply queue (they are folded again: a segment may repeat an
// outcome, and the report keeps the first), or the new one with outcomes it already counts
// (ignored as duplicates). Memory: two bitmaps of `size` bits and the pending outcomes.

/// A fixed-size set of child indexes.
public struct Bitmap: Sendable, Equatable, Codable {
    private var words: [UInt64]
    public let count: Int
    public private(set) var population = 0

    public init(count: Int) {
        self.count = count
        self.words = Array(repeating: 0, count: (count + 63) / 64)
    }

    public subscript(index: Int) -> Bool {
        guard index >= 0, index < self.count else { return false }
        return self.words[index >> 6] & (1 << UInt64(index & 63)) != 0
    }

    /// Sets `index`; false when it was already set or out of range.
    @discardableResult
    public mutating func insert(_ index: Int) -> Bool {
        guard index >= 0, index < self.count, !self[index] else { return false }
        self.words[index >> 6] |= 1 << UInt64(index & 63)
        self.population += 1
        return true
    }

    /// Clears `index`; false when it was not set.
    @discardableResult
    public mutating func remove(_ index: Int) -> Bool {
        guard self[index] else { return false }
        self.words[index >> 6] &= ~(1 << UInt64(index & 63))
        self.population -= 1
        return true
    }

    public mutating func formUnion(_ other: Bitmap) {
        guard other.count == self.count else { return }
        var population = 0
        for i in self.words.indices {
            self.words[i] |= other.words[i]
            population += self.words[i].nonzeroBitCount
        }
        self.population = population
    }

    enum CodingKeys: String, CodingKey { case count, bits }

    public init(from decoder: any Decoder) throws {
        let container = try decoder.container(keyedBy: CodingKeys.self)
        let count = try container.decode(Int.self, forKey: .count)
        guard (0...BatchParser.maxSize).contains(count) else {
            throw DecodingError.dataCorruptedError(forKey: .count, in: container, debugDescription: "bitmap size out of range")
        }
        self.init(count: count)
        let data = try container.decode(Data.self, forKey: .bits)
        guard data.count == self.words.count * 8 else {
            throw DecodingError.dataCorruptedError(forKey: .bits, in: container, debugDescription: "bitmap of the wrong length")
        }
        data.withUnsafeBytes { raw in
            for i in self.words.indices { self.words[i] = UInt64(littleEndian: raw.loadUnaligned(fromByteOffset: i * 8, as: UInt64.self)) }
        }
        // Bits past `count` are cleared so the population is right.
        if count % 64 != 0, let last = self.words.indices.last { self.words[last] &= (1 << UInt64(count % 64)) - 1 }
        self.population = self.words.reduce(0) { $0 + $1.nonzeroBitCount }
    }

    public func encode(to encoder: any Encoder) throws {
        var container = encoder.container(keyedBy: CodingKeys.self)
        try container.encode(self.count, forKey: .count)
        var data = Data(capacity: self.words.count * 8)
        for word in self.words { withUnsafeBytes(of: word.littleEndian) { data.append(contentsOf: $0) } }
        try container.encode(data, forKey: .bits)
    }
}

/// How a batch ended.
public enum BatchStatus: String, Sendable, Codable, Equatable {
    case completed, failed, expired
}

/// The batch's state as the broker holds it (`aq.batch.<id>.state`).
public struct BatchCheckpoint: Sendable, Codable, Equatable {
    public var version: Int
    public var manifest: BatchManifest
    /// Children whose final outcome is in a result segment.
    public var settled: Bitmap
    /// Those of them that failed.
    public var failed: Bitmap
    /// Result segments written (some may repeat an outcome).
    public var segments: Int
    /// Set when the batch has ended: what remains is its webhook and the clean-up.
    public var status: BatchStatus?

    /// The first checkpoint, written when the batch is created.
    public init(manifest: BatchManifest) {
        self.version = 0
        self.manifest = manifest
        self.settled = Bitmap(count: manifest.size)
        self.failed = Bitmap(count: manifest.size)
        self.segments = 0
        self.status = nil
    }

    public func encoded() -> [UInt8] {
        // Encoding our own plain types cannot fail; an empty body would be refused on reading.
        (try? JSONEncoder().encode(self)).map { Array($0) } ?? []
    }

    public static func decode(_ bytes: [UInt8]) -> BatchCheckpoint? {
        guard let checkpoint = try? JSONDecoder().decode(BatchCheckpoint.self, from: Data(bytes)),
              checkpoint.settled.count == checkpoint.manifest.size, checkpoint.failed.count == checkpoint.manifest.size,
              checkpoint.version >= 0, checkpoint.segments >= 0
        else { return nil }
        return checkpoint
    }
}

/// A child's final outcome as published to the reply queue: one JSON object that is also its
/// entry in the batch webhook — `{"index":3,"taskId":"b:3","status":"completed","attempts":1,
/// "result":…}` (or `"error":{…}` when it failed).
///
/// A child replayed from the dead letters into its open batch (`aq dlq replay`) reports with
/// `"rejoined":true`: its outcome replaces the failure the batch counted for it.
public struct ChildOutcome: Sendable, Equatable {
    public enum Status: String, Sendable { case completed, failed }
    public var index: Int
    public var status: Status
    public var rejoined: Bool
    public var json: [UInt8]

    public init(index: Int, status: Status, rejoined: Bool = false, json: [UInt8]) {
        self.index = index
        self.status = status
        self.rejoined = rejoined
        self.json = json
    }

    /// The message a child's bridge publishes when the child has its final outcome.
    public static func make(index: Int, taskId: String, status: Status, attempts: Int, result: [UInt8]?, error: [UInt8]?,
                            rejoined: Bool = false) -> ChildOutcome {
        var json = Array("{\"index\":\(index),\"taskId\":\(JSONScan.quote(taskId)),\"status\":\"\(status.rawValue)\",\"attempts\":\(attempts)".utf8)
        if rejoined { json += Array(",\"rejoined\":true".utf8) }
        if let result { json += Array(",\"result\":".utf8) + result }
        if let error { json += Array(",\"error\":".utf8) + error }
        json.append(UInt8(ascii: "}"))
        return ChildOutcome(index: index, status: status, rejoined: rejoined, json: json)
    }

    /// Reads an outcome message; nil when it is not one.
    public static func parse(_ bytes: [UInt8]) -> ChildOutcome? {
        var index: JSONScan.Member?, status: JSONScan.Member?, rejoined = false
        do {
            try JSONScan.forEachMember(bytes) { (key: Range<Int>, member: JSONScan.Member) throws(JSONScan.Failure) in
                if JSONScan.keyEquals(bytes, key, "index") { index = member }
                if JSONScan.keyEquals(bytes, key, "status") { status = member }
                if JSONScan.keyEquals(bytes, key, "rejoined") { rejoined = member.kind == .bool && bytes[member.range.lowerBound] == UInt8(ascii: "t") }
            }
        } catch {
            return nil
        }
        guard let value = JSONScan.integer(bytes, index, in: 0...(BatchParser.maxSize - 1)), let status, status.kind == .string,
              let text = try? JSONScan.decodeString(bytes, status.range), let kind = Status(rawValue: text)
        else { return nil }
        return ChildOutcome(index: value, status: kind, rejoined: rejoined, json: bytes)
    }
}

/// One batch's aggregation. Feed it what the reply queue delivers; carry out what it returns.
public struct BatchAggregator: Sendable {
    public struct Policy: Sendable {
        /// Persist when this many outcomes are pending…
        public var maxPending = 1000
        /// …or they hold this many bytes…
        public var maxPendingBytes = 1 << 20
        /// …or the oldest has waited this long (the batch webhook's extra delay comes from here).
        public var maxPendingAge = Duration.milliseconds(200)
        /// Persist at least this often while deliveries are held, however few: stays well under
        /// the broker's `consumer_timeout`.
        public var refresh = Duration.seconds(600)

        public init() {}
    }

    /// What a reply-queue delivery was.
    public enum Input: Sendable {
        case outcome(ChildOutcome)
        /// The deadline's mark (the engine sends it when the deadline has passed).
        case deadline
        /// Anything else (unreadable, or not from a trusted publisher): acked with the next
        /// persist, otherwise ignored.
        case ignored
    }

    public enum Action: Sendable, Equatable {
        /// Write `segment` (when not nil) to the results queue and `checkpoint` to the state
        /// queue, both confirmed; remove the checkpoint read before it; ack the reply queue's
        /// deliveries up to `ackUpTo` (multiple; nil: none); then call ``persisted()``.
        case persist(segment: [UInt8]?, checkpoint: BatchCheckpoint, ackUpTo: UInt64?)
        /// The batch is over: build its report from the results queue (``BatchReport``), publish
        /// its webhook (confirmed), then delete the batch's queues.
        case finish(BatchCheckpoint)
    }

    public let policy: Policy
    /// The state as persisted, plus the pending outcomes folded in.
    public private(set) var checkpoint: BatchCheckpoint
    private var pending: [ChildOutcome] = []
    private var pendingBytes = 0
    private var oldestPending: ContinuousClock.Instant?
    private var lastPersist: ContinuousClock.Instant
    private var lastTag: UInt64?
    private var persisting = false
    /// The persist on its way carries the batch's end.
    private var finalPersisting = false
    private var finished = false

    /// An aggregator that takes over from the checkpoint the state queue holds (the newest, when
    /// a crash left two). Returns it with the actions to start with: a batch that had ended
    /// before the crash is finished again.
    public static func restore(_ checkpoint: BatchCheckpoint, policy: Policy = Policy(), now: ContinuousClock.Instant) -> (BatchAggregator, [Action]) {
        var aggregator = BatchAggregator(checkpoint: checkpoint, policy: policy, now: now)
        var actions: [Action] = []
        if checkpoint.status != nil {
            aggregator.finished = true
            actions.append(.finish(checkpoint))
        } else if let status = aggregator.endStatus() {
            actions += aggregator.end(status)
        }
        return (aggregator, actions)
    }

    private init(checkpoint: BatchCheckpoint, policy: Policy, now: ContinuousClock.Instant) {
        self.checkpoint = checkpoint
        self.policy = policy
        self.lastPersist = now
    }

    public var isFinished: Bool { self.finished }
    public var pendingCount: Int { self.pending.count }

    /// A delivery from the reply queue, with its delivery tag.
    public mutating func receive(_ input: Input, tag: UInt64, now: ContinuousClock.Instant) -> [Action] {
        self.receive([input], tag: tag, now: now)
    }

    /// A delivery that carries several inputs (outcomes one bridge published together): all are
    /// folded before anything is persisted, so its ack never runs ahead of one of them.
    public mutating func receive(_ inputs: [Input], tag: UInt64, now: ContinuousClock.Instant) -> [Action] {
        self.lastTag = max(self.lastTag ?? 0, tag)
        guard !self.finished, self.checkpoint.status == nil else { return [] }
        var deadline = false
        for input in inputs {
            switch input {
            case .ignored:
                break
            case .deadline:
                deadline = true
            case .outcome(let outcome):
                // Out of range, or a child that already counts (it ran twice): ignored — unless
                // it failed and this is its replay re-joining the batch: then this outcome counts.
                guard outcome.index < self.checkpoint.manifest.size else { continue }
                if !self.checkpoint.settled.insert(outcome.index) {
                    guard outcome.rejoined, self.checkpoint.failed.remove(outcome.index) else { continue }
                }
                if outcome.status == .failed { self.checkpoint.failed.insert(outcome.index) }
                self.pending.append(outcome)
                self.pendingBytes += outcome.json.count
                if self.oldestPending == nil { self.oldestPending = now }
            }
        }
        if let status = self.endStatus() { return self.end(status) }
        if deadline { return self.end(.expired) }
        return self.persistIfDue(now: now)
    }

    /// Time passes: persists what waited too long, and refreshes a checkpoint that holds
    /// deliveries before the broker's consumer_timeout.
    public mutating func tick(now: ContinuousClock.Instant) -> [Action] {
        guard !self.finished, self.checkpoint.status == nil else { return [] }
        return self.persistIfDue(now: now)
    }

    /// The last ``Action/persist(segment:checkpoint:ackUpTo:)`` was carried out.
    public mutating func persisted(now: ContinuousClock.Instant) -> [Action] {
        self.persisting = false
        self.lastPersist = now
        if self.finalPersisting {
            // The final persist is done: every outcome is in the results queue.
            self.finished = true
            return [.finish(self.checkpoint)]
        }
        // The batch ended while this persist was on its way: the final one follows it.
        if self.checkpoint.status != nil { return [self.persist()] }
        return self.persistIfDue(now: now)
    }

    /// When the batch is over by its join rule.
    private func endStatus() -> BatchStatus? {
        if self.checkpoint.manifest.join == .all, self.checkpoint.failed.population > 0 { return .failed }
        if self.checkpoint.settled.population == self.checkpoint.manifest.size { return .completed }
        return nil
    }

    private mutating func end(_ status: BatchStatus) -> [Action] {
        self.checkpoint.status = status
        // The final persist writes the last segment and the status; finish follows it.
        return self.persisting ? [] : [self.persist()]
    }

    private mutating func persistIfDue(now: ContinuousClock.Instant) -> [Action] {
        guard !self.persisting else { return [] }
        let due = self.pending.count >= self.policy.maxPending || self.pendingBytes >= self.policy.maxPendingBytes
            || (self.oldestPending.map { now - $0 >= self.policy.maxPendingAge } ?? false)
            || (self.lastTag != nil && now - self.lastPersist >= self.policy.refresh)
        return due ? [self.persist()] : []
    }

    private mutating func persist() -> Action {
        self.persisting = true
        self.finalPersisting = self.checkpoint.status != nil
        var segment: [UInt8]?
        if !self.pending.isEmpty {
            var bytes: [UInt8] = [UInt8(ascii: "[")]
            bytes.reserveCapacity(self.pendingBytes + self.pending.count + 2)
            for (i, outcome) in self.pending.enumerated() {
                if i > 0 { bytes.append(UInt8(ascii: ",")) }
                bytes += outcome.json
            }
            bytes.append(UInt8(ascii: "]"))
            segment = bytes
            self.checkpoint.segments += 1
        }
        self.checkpoint.version += 1
        self.pending.removeAll(keepingCapacity: true)
        self.pendingBytes = 0
        self.oldestPending = nil
        let ack = self.lastTag
        self.lastTag = nil
        return .persist(segment: segment, checkpoint: self.checkpoint, ackUpTo: ack)
    }
}

/// The batch webhook's body, built from the checkpoint and the result segments. Pure.
///
/// Segments are added one at a time and let go: memory is a status byte per child plus the
/// entries kept for the report, which stop being kept once they pass `maxBytes`.
public struct BatchReport {
    let checkpoint: BatchCheckpoint
    let maxBytes: Int
    /// 0: no outcome; else the status's raw value's first byte (`c`ompleted, `f`ailed).
    private var statuses: [UInt8]
    private var entries: [[UInt8]?]
    private var keptBytes = 0
    private var overflow = false

    public init(_ checkpoint: BatchCheckpoint, maxBytes: Int) {
        self.checkpoint = checkpoint
        self.maxBytes = maxBytes
        self.statuses = [UInt8](repeating: 0, count: checkpoint.manifest.size)
        self.entries = [[UInt8]?](repeating: nil, count: checkpoint.manifest.size)
    }

    /// Adds a result segment (a JSON array of outcomes); the first outcome of a child wins, except
    /// that a re-joined outcome replaces a failure (segments are added in the order written).
    public mutating func add(segment: [UInt8]) {
        let size = self.checkpoint.manifest.size
        try? JSONScan.forEachElement(segment) { (member: JSONScan.Member) throws(JSONScan.Failure) in
            guard member.kind == .object, let outcome = ChildOutcome.parse(Array(segment[member.range])), outcome.index < size else { return }
            let current = self.statuses[outcome.index]
            guard current == 0 || (current == UInt8(ascii: "f") && outcome.rejoined) else { return }
            self.statuses[outcome.index] = outcome.status == .completed ? UInt8(ascii: "c") : UInt8(ascii: "f")
            guard !self.overflow else { return }
            if current != 0, let replaced = self.entries[outcome.index] {
                self.keptBytes -= replaced.count + 1
                self.entries[outcome.index] = nil
            }
            self.keptBytes += outcome.json.count + 1
            if self.keptBytes > self.maxBytes {
                // The full report cannot fit: stop keeping entries (and let go of those kept).
                self.overflow = true
                self.entries = []
            } else {
                self.entries[outcome.index] = outcome.json
            }
        }
    }

    /// Builds the report: children in input order; children with no outcome are `pending` (an
    /// expired batch) or `skipped` (a batch that failed fast, or ended without them). Over
    /// `maxBytes`, each child is reduced to its index and status (`"resultsOmitted": true`; its
    /// task id is `<batch id>:<index>`); if it is still over, the list stops there
    /// (`"truncated": true`) while the counts stay complete.
    public func build() -> [UInt8] {
        let size = self.checkpoint.manifest.size
        let completed = self.statuses.reduce(0) { $0 + ($1 == UInt8(ascii: "c") ? 1 : 0) }
        let failed = self.statuses.reduce(0) { $0 + ($1 == UInt8(ascii: "f") ? 1 : 0) }
        let status = self.checkpoint.status ?? .completed
        let missing = status == .expired ? "pending" : "skipped"
        let manifest = self.checkpoint.manifest
        var head = "{\"batchId\":\(JSONScan.quote(manifest.id)),\"status\":\"\(status.rawValue)\",\"join\":\"\(manifest.join.rawValue)\""
        head += ",\"size\":\(size),\"counts\":{\"completed\":\(completed),\"failed\":\(failed),\"\(missing)\":\(size - completed - failed)}"
        func name(_ status: UInt8) -> String { status == UInt8(ascii: "c") ? "completed" : status == UInt8(ascii: "f") ? "failed" : missing }
        func list(full: Bool, limit: Int) -> (bytes: [UInt8], complete: Bool) {
            var out: [UInt8] = []
            for index in 0..<size {
                let entry: [UInt8]
                if full, let kept = self.entries[index] {
                    entry = kept
                } else if full {
                    entry = Array("{\"index\":\(index),\"taskId\":\(JSONScan.quote("\(manifest.id):\(index)")),\"status\":\"\(missing)\"}".utf8)
                } else {
                    entry = Array("{\"index\":\(index),\"status\":\"\(name(self.statuses[index]))\"}".utf8)
                }
                if out.count + entry.count + 1 > limit { return (out, false) }
                if !out.isEmpty { out.append(UInt8(ascii: ",")) }
                out += entry
            }
            return (out, true)
        }
        let budget = max(0, self.maxBytes - head.utf8.count - 64)
        var (children, complete) = self.overflow ? ([], false) : list(full: true, limit: budget)
        var omitted = false
        if !complete {
            (children, complete) = list(full: false, limit: budget)
            omitted = true
        }
        var tail = "]"
        if omitted { tail += ",\"resultsOmitted\":true" }
        if !complete { tail += ",\"truncated\":true" }
        tail += "}"
        return Array((head + ",\"children\":[").utf8) + children + Array(tail.utf8)
    }

    /// The report from segments at hand (tests, tools).
    public static func build(_ checkpoint: BatchCheckpoint, segments: [[UInt8]], maxBytes: Int) -> [UInt8] {
        var report = BatchReport(checkpoint, maxBytes: maxBytes)
        for segment in segments { report.add(segment: segment) }
        return report.build()
    }
}
