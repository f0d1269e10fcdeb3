// aq-bench: one run of a bridge (aq-bridge, or any program that consumes AsyncQueue tasks, such as
// the C limit bridge) against our own publisher and HTTP sink, in one process, on one clock.
//
//   aq-bench --url URL --queue Q -n TASKS --mode preload|live|rate|serial [--work tasks|batch|chain]
//            [--steps S] [--rate R] [--bridge-log FILE] [--timeout S] [--label L] -- COMMAND [ARGS...]
//
// The sink (SwiftNIO, one event loop, 127.0.0.1, any free port) answers `POST /cb/<i>` with
// `{"ok":true,"n":1}` and `POST /hook/<i>` with `{"ok":true}`, and records when each arrived. Task i
// is `{"callbackUrl":".../cb/i","payload":{"i":i,"msg":"hello"},"webhookUrl":".../hook/i",
// "retries":3,"timeout":10}` (persistent, application/json, message id task-i), published to the
// default exchange with the queue's name as routing key, with confirms.
//
// - preload: purge Q, publish every task (1,000 unconfirmed at most), start COMMAND; the clock
//   runs from its start to the last webhook.
// - live: start COMMAND, wait until Q has a consumer, publish every task as fast as confirms
//   allow; the clock runs from the first publish to the last webhook.
// - rate: start COMMAND, wait for its consumer, publish R tasks per second; added latency per
//   task: publish confirmed → callback received, and callback answered → webhook received.
//
// The work (--work) is what TASKS callbacks belong to:
// - tasks (default): TASKS tasks as above, request-reply (callback + webhook each).
// - batch: one batch of TASKS children (`/cb/<i>`, no per-child webhook; parts of 5,000 children),
//   its report to `POST /report`; done when the report arrives, which must count TASKS completed.
// - chain: TASKS/S chains of S steps (--steps, default 3); step k of chain c calls `/cb/<c*S+k>`,
//   the chain's final webhook is `/hook/<c>`; done at the last final webhook. With --mode serial
//   the chains run one at a time and the hand-off between two steps (a step's callback received →
//   the next step's callback received) is reported: p50 / p99.
//
// COMMAND gets AQ_AMQP_URL and AQ_QUEUE in its environment ({amqp_url} and {queue} in its
// arguments are replaced), runs in a process group of its own, and is stopped with SIGTERM (then
// SIGKILL after 15 s). Measured at the last webhook: its CPU time (/proc/PID/stat, every thread)
// and peak RSS (VmHWM). Prints one JSON line.
import AMQPClient
import Foundation
import NIOCore
import NIOHTTP1
import NIOPosix
import Synchronization

#if canImport(Glibc)
import Glibc
#endif

struct BenchError: Error, CustomStringConvertible {
    var description: String
    init(_ description: String) { self.description = description }
}

/// CLOCK_MONOTONIC in nanoseconds: the same clock in every thread of this process.
@inline(__always) func nanos() -> UInt64 {
    var ts = timespec()
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return UInt64(ts.tv_sec) * 1_000_000_000 + UInt64(ts.tv_nsec)
}

struct Options {
    enum Mode: String { case preload, live, rate, serial }
    enum Work: String { case tasks, batch, chain }
    var url = ProcessInfo.processInfo.environment["AQ_AMQP_URL"] ?? "amqp://guest:guest@127.0.0.1:5672/%2F"
    var queue = "aq.work.default"
    var tasks = 20_000
    var mode = Mode.preload
    var work = Work.tasks
    var steps = 3
    var rate = 1000.0
    var window = 1000
    var timeout = 600.0
    var label = "bridge"
    var bridgeLog = "/dev/null"
    var command: [String] = []

    init(arguments: [String]) throws {
        var iterator = arguments.dropFirst().makeIterator()
        func value(_ flag: String) throws -> String {
            guard let v = iterator.next() else { throw BenchError("\(flag) needs a value") }
            return v
        }
        func number(_ flag: String) throws -> Double {
            let text = try value(flag)
            guard let v = Double(text), v > 0 else { throw BenchError("\(flag) needs a positive number, not '\(text)'") }
            return v
        }
        while let argument = iterator.next() {
            switch argument {
            case "--url": self.url = try value(argument)
            case "--queue", "-q": self.queue = try value(argument)
            case "-n", "--tasks": self.tasks = Int(try number(argument))
            case "--mode", "-m":
                let text = try value(argument)
                guard let mode = Mode(rawValue: text) else { throw BenchError("--mode is preload, live, rate or serial, not '\(text)'") }
                self.mode = mode
            case "--work", "-w":
                let text = try value(argument)
                guard let work = Work(rawValue: text) else { throw BenchError("--work is tasks, batch or chain, not '\(text)'") }
                self.work = work
            case "--steps", "-s": self.steps = Int(try number(argument))
            case "--rate": self.rate = try number(argument)
            case "--window": self.window = Int(try number(argument))
            case "--timeout": self.timeout = try number(argument)
            case "--label", "-l": self.label = try value(argument)
            case "--bridge-log": self.bridgeLog = try value(argument)
            case "--":
                while let word = iterator.next() { self.command.append(word) }
            case "-h", "--help":
                print("usage: aq-bench [--url URL] [--queue Q] [-n TASKS] [--mode preload|live|rate|serial] [--work tasks|batch|chain] [--steps S] [--rate R] [--window W] [--timeout S] [--label L] [--bridge-log FILE] -- COMMAND [ARGS...]")
                exit(0)
            default: throw BenchError("unknown argument '\(argument)' (try --help; the bridge command goes after --)")
            }
        }
        guard !self.command.isEmpty else { throw BenchError("no bridge command (after --)") }
        switch (self.work, self.mode) {
        case (.tasks, .serial), (.batch, .serial), (.batch, .rate), (.chain, .rate):
            throw BenchError("--mode \(self.mode.rawValue) does not go with --work \(self.work.rawValue)")
        default: break
        }
        if self.work == .chain {
            guard self.steps >= 1, self.steps <= 100, self.tasks >= self.steps else { throw BenchError("--steps is 1 to 100, at most -n") }
            self.tasks -= self.tasks % self.steps
        }
    }

    /// How many final webhooks end the run (chains, or tasks); 0 for a batch (its report ends it).
    var hooks: Int {
        switch self.work {
        case .tasks: return self.tasks
        case .chain: return self.tasks / self.steps
        case .batch: return 0
        }
    }
}

// MARK: The sink

/// When each task's callback and webhook arrived (0: not yet).
final class Recorder: @unchecked Sendable {
    // Safe to share: `callbacks` and `hooks` are written only by the sink's one event-loop thread,
    // each slot at most once (a repeated request keeps the first time), and read by the main task
    // only after it has loaded `hookCount` (acquiring) at the value that thread stored (releasing)
    // after its last write of interest; for the callback of task i, before the webhook of task i.
    let callbacks: UnsafeMutableBufferPointer<UInt64>
    let hooks: UnsafeMutableBufferPointer<UInt64>
    let hookCount = Atomic<Int>(0)
    let callbackCount = Atomic<Int>(0)
    let strays = Atomic<Int>(0)
    /// When the batch report arrived (0: not yet), and how many children it counts completed.
    let reportTime = Atomic<UInt64>(0)
    let reportCompleted = Atomic<Int>(-1)

    init(capacity: Int) {
        self.callbacks = .allocate(capacity: capacity)
        self.callbacks.initialize(repeating: 0)
        self.hooks = .allocate(capacity: capacity)
        self.hooks.initialize(repeating: 0)
    }

    deinit {
        self.callbacks.deallocate()
        self.hooks.deallocate()
    }

    /// On the event loop: the batch report, once.
    func recordReport(_ body: ByteBuffer, at time: UInt64) {
        guard self.reportTime.load(ordering: .relaxed) == 0 else { return }
        let object = body.getBytes(at: body.readerIndex, length: body.readableBytes)
            .flatMap { try? JSONSerialization.jsonObject(with: Data($0)) as? [String: Any] }
        let completed = (object?["counts"] as? [String: Any])?["completed"] as? Int ?? -2
        self.reportCompleted.store(completed, ordering: .relaxed)
        self.reportTime.store(time, ordering: .releasing)
    }

    /// On the event loop.
    func record(_ uri: String, at time: UInt64) -> Bool {
        if uri == "/report" { return true }
        let isCallback = uri.hasPrefix("/cb/"), isHook = uri.hasPrefix("/hook/")
        guard isCallback || isHook, let index = Int(uri.dropFirst(isCallback ? 4 : 6)), index >= 0, index < self.hooks.count else {
            self.strays.add(1, ordering: .relaxed)
            return false
        }
        if isCallback {
            if self.callbacks[index] == 0 {
                self.callbacks[index] = time
                self.callbackCount.add(1, ordering: .relaxed)
            }
        } else if self.hooks[index] == 0 {
            self.hooks[index] = time
            self.hookCount.add(1, ordering: .releasing)
        }
        return true
    }
}

final class SinkHandler: ChannelInboundHandler {
    typealias InboundIn = HTTPServerRequestPart
    typealias OutboundOut = HTTPServerResponsePart

    let recorder: Recorder
    var answer: (HTTPResponseStatus, StaticString) = (.ok, "")
    var keepAlive = true
    var report: ByteBuffer?
    var reportArrived: UInt64 = 0

    init(recorder: Recorder) { self.recorder = recorder }

    func channelRead(context: ChannelHandlerContext, data: NIOAny) {
        switch self.unwrapInboundIn(data) {
        case .head(let head):
            let time = nanos()
            self.keepAlive = head.isKeepAlive
            if head.uri == "/report" {
                self.report = context.channel.allocator.buffer(capacity: 4096)
                self.reportArrived = time
            }
            if self.recorder.record(head.uri, at: time) {
                self.answer = (.ok, head.uri.hasPrefix("/cb/") ? #"{"ok":true,"n":1}"# : #"{"ok":true}"#)
            } else {
                self.answer = (.notFound, #"{"error":"not found"}"#)
            }
        case .body(var part):
            self.report?.writeBuffer(&part)
        case .end:
            if let report = self.report {
                self.recorder.recordReport(report, at: self.reportArrived)
                self.report = nil
            }
            let body = self.answer.1
            var headers = HTTPHeaders()
            headers.add(name: "Content-Type", value: "application/json")
            headers.add(name: "Content-Length", value: String(body.utf8CodeUnitCount))
            if !self.keepAlive { headers.add(name: "Connection", value: "close") }
            context.write(self.wrapOutboundOut(.head(HTTPResponseHead(version: .http1_1, status: self.answer.0, headers: headers))), promise: nil)
            let buffer = body.withUTF8Buffer { context.channel.allocator.buffer(bytes: $0) }
            context.write(self.wrapOutboundOut(.body(.byteBuffer(buffer))), promise: nil)
            let done = context.writeAndFlush(self.wrapOutboundOut(.end(nil)))
            if !self.keepAlive {
                let channel = context.channel
                done.whenComplete { _ in channel.close(promise: nil) }
            }
        }
    }
}

// MARK: The bridge process

struct Bridge {
    let pid: pid_t

    static func spawn(_ command: [String], environment extra: [String: String], log: String) throws -> Bridge {
        var environment = ProcessInfo.processInfo.environment
        for (key, value) in extra { environment[key] = value }
        let argv: [UnsafeMutablePointer<CChar>?] = command.map { strdup($0) } + [nil]
        let envp: [UnsafeMutablePointer<CChar>?] = environment.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer {
            for p in argv { free(p) }
            for p in envp { free(p) }
        }
        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        // Its own process group; no signal blocked and the usual dispositions (this process
        // ignores SIGPIPE, and its runtime's threads may block signals: a child inherits both, and
        // a program with a blocked SIGTERM could only be killed).
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETPGROUP | POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))
        posix_spawnattr_setpgroup(&attributes, 0)
        var none = sigset_t(), defaults = sigset_t()
        sigemptyset(&none)
        posix_spawnattr_setsigmask(&attributes, &none)
        sigemptyset(&defaults)
        for signal in [SIGPIPE, SIGTERM, SIGINT, SIGHUP] { sigaddset(&defaults, signal) }
        posix_spawnattr_setsigdefault(&attributes, &defaults)
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_addopen(&actions, 1, log, O_WRONLY | O_CREAT | O_APPEND, 0o644)
        posix_spawn_file_actions_adddup2(&actions, 1, 2)
        var pid: pid_t = 0
        let status = posix_spawnp(&pid, command[0], &actions, &attributes, argv, envp)
        guard status == 0 else { throw BenchError("cannot start \(command[0]): \(String(cString: strerror(status)))") }
        return Bridge(pid: pid)
    }

    /// False once it has ended (and then it has been reaped).
    var isRunning: Bool {
        var status: Int32 = 0
        return waitpid(self.pid, &status, WNOHANG) == 0
    }

    /// CPU seconds of every thread so far (utime + stime).
    func cpuSeconds() -> Double? {
        guard let text = try? String(contentsOfFile: "/proc/\(self.pid)/stat", encoding: .utf8),
              let close = text.lastIndex(of: ")") else { return nil }
        // Fields after "(comm)": state is field 3; utime and stime are fields 14 and 15.
        let fields = text[text.index(after: close)...].split(separator: " ")
        guard fields.count > 13, let user = Double(fields[11]), let system = Double(fields[12]) else { return nil }
        return (user + system) / Double(sysconf(Int32(_SC_CLK_TCK)))
    }

    /// Peak resident set (VmHWM), in MB.
    func peakRSS() -> Double? {
        guard let text = try? String(contentsOfFile: "/proc/\(self.pid)/status", encoding: .utf8) else { return nil }
        for line in text.split(separator: "\n") where line.hasPrefix("VmHWM:") {
            return line.split(separator: " ").dropFirst().first.flatMap { Double($0) }.map { $0 / 1024 }
        }
        return nil
    }

    func stop() async {
        kill(-self.pid, SIGTERM)
        let deadline = nanos() + 15_000_000_000
        var status: Int32 = 0
        while waitpid(self.pid, &status, WNOHANG) == 0 {
            if nanos() > deadline {
                kill(-self.pid, SIGKILL)
                waitpid(self.pid, &status, 0)
                return
            }
            try? await Task.sleep(for: .milliseconds(10))
        }
    }
}

// MARK: The run

func body(_ i: Int, sink: String) -> [UInt8] {
    Array(#"{"callbackUrl":"\#(sink)/cb/\#(i)","payload":{"i":\#(i),"msg":"hello"},"webhookUrl":"\#(sink)/hook/\#(i)","retries":3,"timeout":10}"#.utf8)
}

func properties(_ i: Int) -> AMQPProperties {
    AMQPProperties(contentType: "application/json", deliveryMode: .persistent, messageId: "task-\(i)")
}

/// The messages of the run's work, in publishing order (built before the clock starts).
func messages(_ o: Options, sink: String, runID: String) -> [(body: [UInt8], properties: AMQPProperties)] {
    switch o.work {
    case .tasks:
        return (0..<o.tasks).map { (body($0, sink: sink), properties($0)) }
    case .batch:
        let id = "bench-\(runID)", part = 5000
        return stride(from: 0, to: o.tasks, by: part).map { offset in
            var text = offset == 0
                ? #"{"batch":{"id":"\#(id)","size":\#(o.tasks),"webhookUrl":"\#(sink)/report"},"tasks":["#
                : #"{"batchPart":{"id":"\#(id)","offset":\#(offset)},"tasks":["#
            for i in offset..<min(o.tasks, offset + part) {
                if i > offset { text += "," }
                text += #"{"callbackUrl":"\#(sink)/cb/\#(i)","payload":{"i":\#(i),"msg":"hello"}}"#
            }
            text += "]}"
            return (Array(text.utf8), AMQPProperties(contentType: "application/json", deliveryMode: .persistent))
        }
    case .chain:
        return (0..<o.hooks).map { c in
            let steps = (0..<o.steps).map { #"{"callbackUrl":"\#(sink)/cb/\#(c * o.steps + $0)"}"# }.joined(separator: ",")
            let text = #"{"chain":{"id":"bench-\#(runID)-\#(c)","webhookUrl":"\#(sink)/hook/\#(c)"},"payload":{"c":\#(c),"msg":"hello"},"steps":[\#(steps)]}"#
            return (Array(text.utf8), AMQPProperties(contentType: "application/json", deliveryMode: .persistent, messageId: "bench-\(runID)-\(c)"))
        }
    }
}

/// Every message, at most `window` unconfirmed. Returns messages/s.
func publishAll(_ channel: AMQPChannel, _ o: Options, _ messages: [(body: [UInt8], properties: AMQPProperties)]) async throws -> Double {
    var inFlight: [AMQPPublishConfirm] = []
    var head = 0
    let start = nanos()
    for message in messages {
        if inFlight.count - head >= o.window {
            guard try await inFlight[head].result() == .confirmed else { throw BenchError("a publish was not confirmed") }
            head += 1
            if head >= 4096 {
                inFlight.removeFirst(head)
                head = 0
            }
        }
        inFlight.append(channel.beginPublish(message.body, routingKey: o.queue, properties: message.properties))
    }
    for confirm in inFlight[head...] {
        guard try await confirm.result() == .confirmed else { throw BenchError("a publish was not confirmed") }
    }
    return Double(messages.count) / (Double(nanos() - start) / 1e9)
}

/// `rate` tasks per second; returns when each was confirmed.
func publishPaced(_ channel: AMQPChannel, _ o: Options, sink: String) async throws -> [UInt64] {
    let (stream, feed) = AsyncStream<(Int, AMQPPublishConfirm)>.makeStream()
    let collector = Task { () throws -> [UInt64] in
        var confirmed = [UInt64](repeating: 0, count: o.tasks)
        for await (i, confirm) in stream {
            guard try await confirm.result() == .confirmed else { throw BenchError("a publish was not confirmed") }
            confirmed[i] = nanos()
        }
        return confirmed
    }
    let start = nanos()
    let interval = 1e9 / o.rate
    for i in 0..<o.tasks {
        let due = start + UInt64(Double(i) * interval)
        let now = nanos()
        if due > now { try await Task.sleep(for: .nanoseconds(Int64(due - now))) }
        feed.yield((i, channel.beginPublish(body(i, sink: sink), routingKey: o.queue, properties: properties(i))))
    }
    feed.finish()
    return try await collector.value
}

func percentiles(_ values: [Double]) -> [String: Double] {
    let sorted = values.sorted()
    guard !sorted.isEmpty else { return [:] }
    func at(_ q: Double) -> Double { sorted[min(sorted.count - 1, Int((q * Double(sorted.count - 1)).rounded()))] }
    func ms(_ ns: Double) -> Double { (ns / 1e4).rounded() / 100 }
    return ["p50": ms(at(0.5)), "p99": ms(at(0.99)), "p999": ms(at(0.999)), "max": ms(sorted[sorted.count - 1])]
}

func json(_ fields: [(String, Any)]) -> String {
    "{" + fields.map { key, value -> String in
        switch value {
        case let text as String: return "\"\(key)\":\"\(text)\""
        case let number as Double: return "\"\(key)\":\(number.isFinite ? String(format: "%.3f", number) : "null")"
        case let map as [String: Double]:
            return "\"\(key)\":{" + map.keys.sorted().map { "\"\($0)\":\(String(format: "%.2f", map[$0] ?? 0))" }.joined(separator: ",") + "}"
        default: return "\"\(key)\":\(value)"
        }
    }.joined(separator: ",") + "}"
}

func run(_ o: Options) async throws -> String {
    // The sink.
    let recorder = Recorder(capacity: o.tasks)
    let runID = String(UInt64.random(in: 0...UInt64.max), radix: 36)
    let group = MultiThreadedEventLoopGroup(numberOfThreads: 1)
    let server = try await ServerBootstrap(group: group)
        .serverChannelOption(.backlog, value: 1024)
        .serverChannelOption(.socketOption(.so_reuseaddr), value: 1)
        .childChannelOption(.tcpOption(.tcp_nodelay), value: 1)
        .childChannelInitializer { channel in
            channel.eventLoop.makeCompletedFuture {
                try channel.pipeline.syncOperations.configureHTTPServerPipeline(withPipeliningAssistance: true, withErrorHandling: true)
                try channel.pipeline.syncOperations.addHandler(SinkHandler(recorder: recorder))
            }
        }
        .bind(host: "127.0.0.1", port: 0).get()
    guard let port = server.localAddress?.port else { throw BenchError("the sink has no port") }
    let sink = "http://127.0.0.1:\(port)"

    // The publisher.
    let connection = try await AMQPConnection.connect(o.url, connectionName: "aq-bench")
    let channel = try await connection.openChannel()
    _ = try await channel.declareQueue(o.queue, passive: true)
    try await channel.purgeQueue(o.queue)
    try await channel.enableConfirms()

    let command = o.command.map { $0.replacingOccurrences(of: "{amqp_url}", with: o.url).replacingOccurrences(of: "{queue}", with: o.queue) }
    let environment = ["AQ_AMQP_URL": o.url, "AQ_QUEUE": o.queue]
    var publishRate = 0.0
    var confirmed: [UInt64] = []
    var bridge: Bridge
    var start: UInt64
    func waitForConsumer(_ bridge: Bridge) async throws {
        let deadline = nanos() + 60_000_000_000
        while try await channel.declareQueue(o.queue, passive: true).consumerCount == 0 {
            guard bridge.isRunning else { throw BenchError("the bridge ended before it consumed (see \(o.bridgeLog))") }
            guard nanos() < deadline else { throw BenchError("the bridge did not consume within 60 s") }
            try await Task.sleep(for: .milliseconds(5))
        }
    }
    switch o.mode {
    case .preload:
        let work = messages(o, sink: sink, runID: runID)
        publishRate = try await publishAll(channel, o, work)
        start = nanos()
        bridge = try Bridge.spawn(command, environment: environment, log: o.bridgeLog)
    case .live:
        let work = messages(o, sink: sink, runID: runID)
        bridge = try Bridge.spawn(command, environment: environment, log: o.bridgeLog)
        try await waitForConsumer(bridge)
        start = nanos()
        publishRate = try await publishAll(channel, o, work)
    case .serial:
        let work = messages(o, sink: sink, runID: runID)
        bridge = try Bridge.spawn(command, environment: environment, log: o.bridgeLog)
        try await waitForConsumer(bridge)
        start = nanos()
        for (c, message) in work.enumerated() {
            guard try await channel.beginPublish(message.body, routingKey: o.queue, properties: message.properties).result() == .confirmed else {
                throw BenchError("a publish was not confirmed")
            }
            let deadline = nanos() + 60_000_000_000
            while recorder.hookCount.load(ordering: .acquiring) <= c {
                guard bridge.isRunning else { throw BenchError("the bridge ended after \(c) chains (see \(o.bridgeLog))") }
                guard nanos() < deadline else {
                    await bridge.stop()
                    throw BenchError("chain \(c) did not end within 60 s")
                }
                try await Task.sleep(for: .microseconds(200))
            }
        }
        publishRate = Double(work.count) / (Double(nanos() - start) / 1e9)
    case .rate:
        bridge = try Bridge.spawn(command, environment: environment, log: o.bridgeLog)
        try await waitForConsumer(bridge)
        start = nanos()
        confirmed = try await publishPaced(channel, o, sink: sink)
        publishRate = Double(o.tasks) / (Double(nanos() - start) / 1e9)
    }

    // Until every final webhook (or the batch's report) arrived.
    func done() -> Bool {
        o.work == .batch ? recorder.reportTime.load(ordering: .acquiring) != 0 : recorder.hookCount.load(ordering: .acquiring) >= o.hooks
    }
    let deadline = start + UInt64(o.timeout * 1e9)
    var lastCount = 0, lastProgress = nanos()
    while !done() {
        let count = recorder.callbackCount.load(ordering: .relaxed) + recorder.hookCount.load(ordering: .relaxed)
        if count != lastCount { (lastCount, lastProgress) = (count, nanos()) }
        let callbacks = recorder.callbackCount.load(ordering: .relaxed)
        guard bridge.isRunning else {
            throw BenchError("the bridge ended after \(callbacks) of \(o.tasks) callbacks (see \(o.bridgeLog))")
        }
        guard nanos() < deadline, nanos() - lastProgress < 60_000_000_000 else {
            await bridge.stop()
            throw BenchError("\(callbacks) of \(o.tasks) callbacks and \(recorder.hookCount.load(ordering: .relaxed)) webhooks within the time allowed")
        }
        try await Task.sleep(for: .milliseconds(1))
    }
    let cpu = bridge.cpuSeconds() ?? .nan
    let rss = bridge.peakRSS() ?? .nan
    let lastCallback = recorder.callbacks.max() ?? 0
    let end = o.work == .batch ? recorder.reportTime.load(ordering: .acquiring) : (recorder.hooks.max() ?? nanos())
    let callbacks = recorder.callbackCount.load(ordering: .relaxed)
    if o.work == .batch, recorder.reportCompleted.load(ordering: .relaxed) != o.tasks {
        await bridge.stop()
        throw BenchError("the batch report counts \(recorder.reportCompleted.load(ordering: .relaxed)) completed children, not \(o.tasks)")
    }
    guard callbacks == o.tasks else {
        await bridge.stop()
        throw BenchError("\(callbacks) distinct callbacks for \(o.tasks) tasks at the end")
    }
    await bridge.stop()
    let left = try await channel.declareQueue(o.queue, passive: true).messageCount
    await connection.close()
    try await server.close()
    try await group.shutdownGracefully()

    var fields: [(String, Any)] = [
        ("label", o.label), ("mode", o.mode.rawValue), ("work", o.work.rawValue), ("tasks", o.tasks),
        ("tasks_per_s", Double(o.tasks) / (Double(end - start) / 1e9)),
        ("publish_per_s", publishRate),
        ("cpu_us_per_task", cpu * 1e6 / Double(o.tasks)),
        ("peak_rss_mb", rss),
        ("left_in_queue", Int(left)),
        ("stray_requests", recorder.strays.load(ordering: .relaxed)),
    ]
    if o.work == .chain { fields.append(("steps", o.steps)) }
    if o.work == .batch { fields.append(("report_after_last_callback_ms", Double(Int64(bitPattern: end &- lastCallback)) / 1e6)) }
    if o.mode == .serial {
        var handoffs: [Double] = []
        for c in 0..<o.hooks {
            for k in 1..<o.steps {
                let before = recorder.callbacks[c * o.steps + k - 1], after = recorder.callbacks[c * o.steps + k]
                if before > 0, after > before { handoffs.append(Double(after - before)) }
            }
        }
        fields.append(("handoff_ms", percentiles(handoffs)))
    }
    if o.mode == .rate {
        var toCallback: [Double] = [], toHook: [Double] = []
        toCallback.reserveCapacity(o.tasks)
        toHook.reserveCapacity(o.tasks)
        for i in 0..<o.tasks {
            let callback = recorder.callbacks[i], hook = recorder.hooks[i]
            if callback > 0 { toCallback.append(Double(Int64(bitPattern: callback &- confirmed[i]))) }
            if callback > 0, hook > 0 { toHook.append(Double(hook - callback)) }
        }
        fields.append(("rate", o.rate))
        fields.append(("confirmed_to_callback_ms", percentiles(toCallback)))
        fields.append(("callback_to_webhook_ms", percentiles(toHook)))
    }
    return json(fields)
}

@main
struct BridgeBench {
    static func main() async {
        signal(SIGPIPE, SIG_IGN)
        do {
            let options = try Options(arguments: CommandLine.arguments)
            print(try await run(options))
        } catch {
            FileHandle.standardError.write(Data("aq-bench: \(error)\n".utf8))
            exit(1)
        }
    }
}
