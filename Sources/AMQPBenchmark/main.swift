// aq-amqp-bench: publish-with-confirms and consume rates of the AMQPClient module, measured the
// way ../shared/bench/limits.sh measures the C tools (aqpub/aqcons): 200-byte persistent messages
// on a durable queue, a sliding window of 1,000 unconfirmed publishes, then consumers with
// prefetch 100 / 1000 acking each message, and prefetch 1000 with a multiple-ack every 100.
//
// usage: aq-amqp-bench [--url URL] [-n COUNT] [--size BYTES] [--window W] [--queue NAME] [--json]
import AMQPClient
import Foundation

struct Options {
    var url = ProcessInfo.processInfo.environment["AQ_AMQP_URL"] ?? "amqp://guest:guest@127.0.0.1:5672/%2F"
    var count = 100_000
    var size = 200
    var window = 1000
    var queue = "aq.bench.amqp"
    var json = false
    var only: String?

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
            case "-h", "--help":
                print("usage: aq-amqp-bench [--url URL] [-n COUNT] [--size BYTES] [--window W] [--queue NAME] [--only publish|p100|p1000|p1000m100] [--json]")
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

/// Consumes `count` messages; acks each one, or every `ackEvery` with `multiple`. Returns msg/s.
func consume(_ connection: AMQPConnection, _ o: Options, prefetch: UInt16, ackEvery: Int) async throws -> Double {
    let channel = try await connection.openChannel()
    try await channel.setPrefetch(prefetch)
    let clock = ContinuousClock()
    let start = clock.now
    let consumer = try await channel.consume(o.queue)
    var received = 0
    for try await delivery in consumer {
        received += 1
        if ackEvery <= 1 {
            try delivery.ack()
        } else if received % ackEvery == 0 || received == o.count {
            try delivery.ack(multiple: true)
        }
        if received == o.count { break }
    }
    let elapsed = clock.now - start
    try await consumer.cancel()
    try await channel.close()
    return Double(received) / seconds(elapsed)
}

@main
struct Bench {
    static func main() async {
        do {
            let o = try Options(arguments: CommandLine.arguments)
            let connection = try await AMQPConnection.connect(o.url, connectionName: "aq-amqp-bench")
            let channel = try await connection.openChannel()
            try await channel.declareQueue(o.queue, durable: true)
            try await channel.purgeQueue(o.queue)
            try await channel.enableConfirms()
            var results: [(String, Double)] = []
            for (name, prefetch, ackEvery) in [("p100_ackeach", UInt16(100), 1), ("p1000_ackeach", 1000, 1), ("p1000_ackmulti100", 1000, 100)] {
                if let only = o.only, only != "publish", name != only, !name.hasPrefix(only + "_") { continue }
                try await channel.purgeQueue(o.queue)
                let published = try await publishConfirmed(channel, o)
                results.append(("aq_publish_confirmed", published))
                if o.only == "publish" { continue }
                let consumed = try await consume(connection, o, prefetch: prefetch, ackEvery: ackEvery)
                results.append(("aq_consume_\(name)", consumed))
                if !o.json {
                    print(String(format: "publish(confirm,W%d): %.0f msg/s; consume(prefetch %d, %@): %.0f msg/s",
                                 o.window, published, prefetch, ackEvery == 1 ? "ack each" : "multiple-ack every \(ackEvery)", consumed))
                }
            }
            try await channel.deleteQueue(o.queue)
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
