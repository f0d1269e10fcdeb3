// aq-amqp-bench: publish-with-confirms and consume rates of the AMQPClient module, measured the
// way ../shared/bench/limits.sh measures the C tools (aqpub/aqcons): 200-byte persistent messages
// on a durable queue, a sliding window of 1,000 unconfirmed publishes, then consumers with
// prefetch 100 / 1000 acking each message, and prefetch 1000 with a multiple-ack every 100; each
// with the async sequence (`AMQPChannel.consume`) iterated by a task on the default executor,
// in the `_exec` cases by a task on the connection's executor (`AMQPConnection.executor`), and in
// the `_thread` cases with a consumer on the connection thread (`AMQPThreadContext.consume`, what
// aq-bridge runs on). Consumers are clocked from the first delivery to the last, as aqcons is.
//
// usage: aq-amqp-bench [--url URL] [-n COUNT] [--size BYTES] [--window W] [--queue NAME]
//                      [--only publish|CASE,...] [--consume-only] [--json]
import AMQPClient
import Foundation
import Synchronization

struct Options {
    var url = ProcessInfo.processInfo.environment["AQ_AMQP_URL"] ?? "amqp://guest:guest@127.0.0.1:5672/%2F"
    var count = 100_000
    var size = 200
    var window = 1000
    var queue = "aq.bench.amqp"
    var json = false
    var only: String?
    /// Consume what is already in the queue (published by another tool) instead of publishing
    /// first, and leave the queue in place: for profiling the consume path on its own.
    var consumeOnly = false

    init(arguments: [String]) throws {
        var iterator = arguments.dropFirst().makeIterator()
        func value(_ flag: String) throws -> String {
            guard let v = iterator.next() else { throw BenchError("\(flag) needs a value") }
            return v
        }
        func int(_ flag: String) throws -> Int {
            let text = try value(flag)
            guard let v = Int(text), v > 0 else { throw BenchError("\(flag) needs a positive integer, not '\(text)'") }
            return v
        }
        while let argument = iterator.next() {
            switch argument {
            case "--url": self.url = try value(argument)
            case "-n", "--count": self.count = try int(argument)
            case "--size": self.size = try int(argument)
            case "--window": self.window = try int(argument)
            case "--queue": self.queue = try value(argument)
            case "--only": self.only = try value(argument)
            case "--json": self.json = true
            case "--consume-only": self.consumeOnly = true
            case "-h", "--help":
                print("usage: aq-amqp-bench [--url URL] [-n COUNT] [--size BYTES] [--window W] [--queue NAME] [--only publish|CASE,...] [--consume-only] [--json]\ncases: \(ConsumeCase.all.map(\.name).joined(separator: " "))")
                exit(0)
            default: throw BenchError("unknown argument '\(argument)' (try --help)")
            }
        }
    }
}

struct BenchError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

func seconds(_ d: Duration) -> Double {
    Double(d.components.seconds) + Double(d.components.attoseconds) / 1e18
}

/// Publishes `count` persistent messages with at most `window` unconfirmed; returns msg/s.
func publishConfirmed(_ channel: AMQPChannel, _ o: Options) async throws -> Double {
    let body = [UInt8](repeating: UInt8(ascii: "x"), count: o.size)
    let properties = AMQPProperties(contentType: "application/octet-stream", deliveryMode: .persistent)
    var inFlight: [AMQPPublishConfirm] = []
    inFlight.reserveCapacity(o.window)
    var head = 0
    let clock = ContinuousClock()
    let start = clock.now
    for _ in 0..<o.count {
        if inFlight.count - head >= o.window {
            _ = try await inFlight[head].result()
            head += 1
            if head >= 4096 {
                inFlight.removeFirst(head)
                head = 0
            }
        }
        inFlight.append(channel.beginPublish(body, routingKey: o.queue, properties: properties))
    }
    for confirm in inFlight[head...] { _ = try await confirm.result() }
    return Double(o.count) / seconds(clock.now - start)
}

/// One consumer setting: prefetch, ack every `ackEvery` (1: each message on its own; more: one
/// `multiple` ack every `ackEvery`), and which API consumes.
struct ConsumeCase {
    enum API: CaseIterable {
        /// The async sequence (`AMQPChannel.consume`), iterated on the default executor.
        case sequence
        /// The async sequence, iterated by a task on the connection's executor.
        case executor
        /// The thread-hosted consumer (`AMQPThreadContext.consume`, what aq-bridge runs on).
        case thread

        var suffix: String {
            switch self {
            case .sequence: ""
            case .executor: "_exec"
            case .thread: "_thread"
            }
        }
    }

    var name: String
    var prefetch: UInt16
    var ackEvery: Int
    var api: API

    static let all: [ConsumeCase] = API.allCases.flatMap { api in
        [("p100_ackeach", UInt16(100), 1), ("p1000_ackeach", 1000, 1), ("p1000_ackmulti100", 1000, 100)].map {
            ConsumeCase(name: $0.0 + api.suffix, prefetch: $0.1, ackEvery: $0.2, api: api)
        }
    }

    /// Whether the `received`-th of `count` deliveries is acked, and with `multiple`.
    func ack(_ received: Int, of count: Int) -> (send: Bool, multiple: Bool) {
        if self.ackEvery <= 1 { return (true, false) }
        return (received % self.ackEvery == 0 || received == count, true)
    }

    var label: String {
        "prefetch \(self.prefetch), " + (self.ackEvery == 1 ? "ack each" : "multiple-ack every \(self.ackEvery)")
            + (self.api == .thread ? ", on the connection thread" : self.api == .executor ? ", on the connection's executor" : "")
    }
}

/// Consumes `count` messages with the async sequence; returns msg/s. As aqcons does, the clock
/// starts at the first delivery and stops at the last.
func consume(_ connection: AMQPConnection, _ o: Options, _ c: ConsumeCase) async throws -> Double {
    let channel = try await connection.openChannel()
    try await channel.setPrefetch(c.prefetch)
    let clock = ContinuousClock()
    var start = clock.now
    let consumer = try await channel.consume(o.queue)
    var received = 0
    for try await delivery in consumer {
        received += 1
        if received == 1 { start = clock.now }
        let ack = c.ack(received, of: o.count)
        if ack.send { try delivery.ack(multiple: ack.multiple) }
        if received == o.count { break }
    }
    let elapsed = clock.now - start
    try await consumer.cancel()
    try await channel.close()
    return Double(received) / seconds(elapsed)
}

/// The thread-hosted consumer's count, kept on the connection thread, and its end for the task
/// that waits.
final class ThreadCount: Sendable {
    private struct State {
        var rate: Double?
        var waiter: CheckedContinuation<Double, Never>?
    }
    private let state = Mutex(State())

    func finished(_ rate: Double) {
        let waiter = self.state.withLock { state -> CheckedContinuation<Double, Never>? in
            state.rate = rate
            defer { state.waiter = nil }
            return state.waiter
        }
        waiter?.resume(returning: rate)
    }

    func wait() async -> Double {
        await withCheckedContinuation { continuation in
            let rate = self.state.withLock { state -> Double? in
                if state.rate == nil { state.waiter = continuation }
                return state.rate
            }
            if let rate { continuation.resume(returning: rate) }
        }
    }
}

/// Consumes `count` messages with a consumer hosted on the connection thread (deliveries handed
/// to a closure as they are read, acks coalesced per turn); returns msg/s, clocked as above.
func consumeOnThread(_ connection: AMQPConnection, _ o: Options, _ c: ConsumeCase) async throws -> Double {
    let done = ThreadCount()
    let (queue, count) = (o.queue, o.count)
    let (channel, tag) = try await connection.withThreadContext { context in
        let channel = try context.openChannel()
        try context.setPrefetch(channel: channel, count: c.prefetch)
        let clock = ContinuousClock()
        var start = clock.now
        var received = 0
        let tag = try context.consume(channel: channel, queue: queue, handler: { delivery in
            received += 1
            if received == 1 { start = clock.now }
            let ack = c.ack(received, of: count)
            if ack.send { context.ack(delivery, multiple: ack.multiple) }
            if received == count { done.finished(Double(received) / seconds(clock.now - start)) }
        }, onEnd: { _ in })
        return (channel, tag)
    }
    let rate = await done.wait()
    try await connection.withThreadContext { context in try context.cancelConsumer(channel: channel, tag: tag) }
    return rate
}

@main
struct Bench {
    static func main() async {
        do {
            let o = try Options(arguments: CommandLine.arguments)
            let cases = o.only == "publish" ? [] : ConsumeCase.all.filter { o.only == nil || o.only?.split(separator: ",").contains(Substring($0.name)) == true }
            if o.only != "publish", cases.isEmpty {
                throw BenchError("--only '\(o.only ?? "")' names no case: publish, or some of \(ConsumeCase.all.map(\.name).joined(separator: ","))")
            }
            let connection = try await AMQPConnection.connect(o.url, connectionName: "aq-amqp-bench")
            let channel = try await connection.openChannel()
            try await channel.declareQueue(o.queue, durable: true)
            if !o.consumeOnly { try await channel.purgeQueue(o.queue) }
            try await channel.enableConfirms()
            var results: [(String, Double)] = []
            if o.only == "publish" {
                let published = try await publishConfirmed(channel, o)
                results.append(("aq_publish_confirmed", published))
                if !o.json { print(String(format: "publish(confirm,W%d): %.0f msg/s", o.window, published)) }
            }
            for c in cases {
                var published: Double?
                if !o.consumeOnly {
                    try await channel.purgeQueue(o.queue)
                    published = try await publishConfirmed(channel, o)
                    results.append(("aq_publish_confirmed", published ?? 0))
                }
                let consumed: Double
                switch c.api {
                case .sequence: consumed = try await consume(connection, o, c)
                case .executor: consumed = try await withTaskExecutorPreference(connection.executor) { try await consume(connection, o, c) }
                case .thread: consumed = try await consumeOnThread(connection, o, c)
                }
                results.append(("aq_consume_\(c.name)", consumed))
                if !o.json {
                    let publishing = published.map { String(format: "publish(confirm,W%d): %.0f msg/s; ", o.window, $0) } ?? ""
                    print(publishing + String(format: "consume(%@): %.0f msg/s", c.label, consumed))
                }
            }
            if !o.consumeOnly { try await channel.deleteQueue(o.queue) }
            await connection.close()
            if o.json {
                let fields = results.map { "\"\($0.0)\":\(Int($0.1))" }.joined(separator: ",")
                print("{\(fields)}")
            }
        } catch {
            FileHandle.standardError.write(Data("aq-amqp-bench: \(error)\n".utf8))
            exit(1)
        }
    }
}
