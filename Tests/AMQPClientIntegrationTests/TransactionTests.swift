import AMQPClient
import Foundation
import Testing

@Suite(.timeLimit(.minutes(2))) struct TransactionTests {
    /// A transaction's publishes and acks happen together at commit, or not at all when the
    /// connection goes first: how `aq dlq replay` moves a letter without a window for duplicates.
    @Test func publishesAndAcksTakeEffectTogetherAtCommitOrNotAtAll() async throws {
        let setup = try await TestBroker.connect()
        let control = try await setup.openChannel()
        let source = TestBroker.uniqueName("aq.test.tx-src"), target = TestBroker.uniqueName("aq.test.tx-dst")
        for queue in [source, target] { try await control.declareQueue(queue, durable: true, arguments: ["x-queue-type": "quorum"]) }
        for i in 0..<2 { try await control.publish("m\(i)", routingKey: source, properties: AMQPProperties(deliveryMode: .persistent)) }
        try await waitFor("2 messages in the source") { try await control.declareQueue(source, passive: true).messageCount == 2 }

        // Moved in a transaction, then the connection closes before the commit: nothing happened.
        let first = try await TestBroker.connect()
        let channel = try await first.openChannel()
        try await channel.enableTransactions()
        var iterator = try await channel.consume(source).makeAsyncIterator()
        let delivery = try await next(&iterator)
        _ = channel.beginPublish(delivery.body, routingKey: target, properties: AMQPProperties(deliveryMode: .persistent), mandatory: true)
        try delivery.ack()
        _ = try await channel.declareQueue(target, passive: true)  // a round trip: the publish and the ack reached the broker
        #expect(try await control.declareQueue(target, passive: true).messageCount == 0, "nothing published before the commit")
        await first.close()
        try await waitFor("both messages back in the source") { try await control.declareQueue(source, passive: true).messageCount == 2 }
        #expect(try await control.declareQueue(target, passive: true).messageCount == 0)

        // The same, committed: the copy is in the target and the original gone, at once.
        let second = try await TestBroker.connect()
        let mover = try await second.openChannel()
        try await mover.enableTransactions()
        try await mover.setPrefetch(1)
        var moving = try await mover.consume(source).makeAsyncIterator()
        let again = try await next(&moving)
        _ = mover.beginPublish(again.body, routingKey: target, properties: AMQPProperties(deliveryMode: .persistent), mandatory: true)
        try again.ack()
        let returned = try await mover.commit()
        #expect(returned.isEmpty)
        #expect(try await control.declareQueue(target, passive: true).messageCount == 1, "the commit answers once the copy is enqueued")
        await second.close()
        try await waitFor("one message left in the source") { try await control.declareQueue(source, passive: true).messageCount == 1 }
        for queue in [source, target] { _ = try await control.deleteQueue(queue) }
        await setup.close()
    }

    @Test func aCommitListsTheMandatoryPublishesNoQueueTook() async throws {
        let connection = try await TestBroker.connect()
        let channel = try await connection.openChannel()
        let queue = TestBroker.uniqueName()
        try await channel.declareQueue(queue, exclusive: true)
        try await channel.enableTransactions()
        _ = channel.beginPublish(Array("a".utf8), routingKey: queue, properties: AMQPProperties(messageId: "routed"), mandatory: true)
        _ = channel.beginPublish(Array("b".utf8), routingKey: TestBroker.uniqueName("nowhere"), properties: AMQPProperties(messageId: "lost"), mandatory: true)
        let returned = try await channel.commit()
        #expect(returned.map(\.properties.messageId) == ["lost"])
        #expect(returned.first?.replyCode == 312 && returned.first?.body == Array("b".utf8))
        #expect(try await channel.commit().isEmpty, "each commit reports its own returns")
        #expect(try await channel.declareQueue(queue, passive: true).messageCount == 1)
        // AMQP allows no confirms on a transactional channel (and no transactions on a confirming one).
        await #expect(throws: AMQPError.self) { try await channel.enableConfirms() }
        let confirming = try await connection.openChannel()
        try await confirming.enableConfirms()
        await #expect(throws: AMQPError.self) { try await confirming.enableTransactions() }
        await connection.close()
    }

    /// The broker closes the channel mid-transaction (a publish to a missing exchange): the
    /// transaction is gone, so the commit must fail rather than commit what came after the reopen.
    @Test func aTransactionTheBrokerCutShortCommitsNothing() async throws {
        let connection = try await TestBroker.connect()
        let channel = try await connection.openChannel()
        let queue = TestBroker.uniqueName()
        try await channel.declareQueue(queue, exclusive: true)
        try await channel.enableTransactions()
        _ = channel.beginPublish(Array("a".utf8), routingKey: queue)
        _ = channel.beginPublish(Array("x".utf8), exchange: TestBroker.uniqueName("no-such-exchange"), routingKey: queue)
        _ = channel.beginPublish(Array("b".utf8), routingKey: queue)
        await #expect(throws: AMQPError.self) { try await channel.commit() }
        let control = try await connection.openChannel()
        #expect(try await control.declareQueue(queue, passive: true).messageCount == 0, "nothing of it committed")
        // The channel goes on in transaction mode.
        _ = channel.beginPublish(Array("c".utf8), routingKey: queue)
        #expect(try await channel.commit().isEmpty)
        #expect(try await control.declareQueue(queue, passive: true).messageCount == 1)
        await connection.close()
    }
}
