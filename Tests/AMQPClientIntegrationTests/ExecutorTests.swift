import AMQPClient
import Foundation
import Testing

/// The kernel's name of the calling thread (connection threads are `aq-amqp-<id>`).
private func currentThreadName() -> String {
    let name = (try? String(contentsOfFile: "/proc/thread-self/comm", encoding: .utf8)) ?? ""
    return name.trimmingCharacters(in: .whitespacesAndNewlines)
}

/// Code run with a preference for the connection's executor, `AMQPConnection.executor`.
@Suite(.timeLimit(.minutes(1))) struct ConnectionExecutorTests {
    @Test func aConsumerIteratedOnTheConnectionsExecutorRunsOnItsThreadAndGetsEveryMessageOnceInOrder() async throws {
        let connection = try await TestBroker.connect()
        let channel = try await connection.openChannel()
        let queue = TestBroker.uniqueName()
        try await channel.declareQueue(queue, durable: true)
        try await channel.enableConfirms()
        let total = 5_000
        var confirms: [AMQPPublishConfirm] = []
        for index in 0..<total {
            confirms.append(channel.beginPublish(Array("\(index)".utf8), routingKey: queue,
                                                 properties: AMQPProperties(deliveryMode: .persistent)))
        }
        for confirm in confirms { _ = try await confirm.result() }

        let consumerChannel = try await connection.openChannel()
        try await consumerChannel.setPrefetch(500)
        let consumer = try await consumerChannel.consume(queue)
        let expectedThread = "aq-amqp-\(connection.id)"
        let (received, threads) = try await withTaskExecutorPreference(connection.executor) {
            var received: [Int] = []
            var threads = Set<String>()
            for try await delivery in consumer {
                threads.insert(currentThreadName())
                received.append(Int(delivery.bodyString) ?? -1)
                // Every tenth with `multiple`, like a batching consumer; the last settles the rest.
                if received.count % 10 == 0 || received.count == total { try delivery.ack(multiple: true) }
                if received.count == total { break }
            }
            return (received, threads)
        }
        #expect(received == Array(0..<total))
        #expect(threads == [expectedThread])
        try await consumer.cancel()
        // Closing the channel would put back anything unacknowledged: the queue stays empty only
        // if every ack given on the executor reached the broker.
        try await consumerChannel.close()
        let info = try await channel.declareQueue(queue, passive: true)
        #expect(info.messageCount == 0)
        try await channel.deleteQueue(queue)
        await connection.close()
    }

    @Test func aTaskOnTheConnectionsExecutorCanAwaitRoundTripsAndConfirmsOfItsOwnConnection() async throws {
        let connection = try await TestBroker.connect()
        let queue = TestBroker.uniqueName()
        // Each await below is answered by the very thread the task runs on: it must suspend the
        // task, not block the thread.
        let (count, got) = try await withTaskExecutorPreference(connection.executor) {
            let channel = try await connection.openChannel()
            try await channel.declareQueue(queue, durable: false, autoDelete: false)
            try await channel.enableConfirms()
            for index in 0..<200 {
                let result = try await channel.publish(Array("m\(index)".utf8), routingKey: queue)
                #expect(result == .confirmed)
            }
            let info = try await channel.declareQueue(queue, passive: true)
            let got = try await channel.get(queue, noAck: true)
            try await channel.deleteQueue(queue)
            return (info.messageCount, got?.bodyString)
        }
        #expect(count == 200)
        #expect(got == "m0")
        await connection.close()
    }

    @Test func aTaskThatStillPrefersTheExecutorOfAClosedConnectionKeepsRunning() async throws {
        let connection = try await TestBroker.connect()
        let executor = connection.executor
        await connection.close()
        #expect(!connection.isConnected)
        let value = await withTaskExecutorPreference(executor) { () async -> Int in
            var total = 0
            for step in 1...3 {
                await Task.yield()  // each resumption is a job the closed connection cannot run
                total += step
            }
            return total
        }
        #expect(value == 6)
    }
}
