// The shared-counter app used by the Croquet tests, in Node and in the browser: one model
// with a count, bumped by "inc" events. `lib` is the Croquet or Multisynq library object.
// The model persists its count (SAVE), so a later session of the same app starts from it.
(function (root, factory) {
    if (typeof module === "object" && module.exports) module.exports = factory;
    else root.CounterApp = factory;
})(typeof self !== "undefined" ? self : this, function defineCounter(lib, onChange) {
    class Counter extends lib.Model {
        init(options, persisted) {
            this.count = persisted ? persisted.count : 0;
            this.subscribe("counter", "inc", this.inc);
        }
        inc() {
            this.count++;
            this.publish("counter", "changed", this.count);
            this.persistSession(() => ({ count: this.count }));
        }
    }
    Counter.register("Counter");

    class CounterView extends lib.View {
        constructor(model) {
            super(model);
            this.model = model;
            this.subscribe("counter", "changed", this.changed);
            onChange(model.count, this);
        }
        changed() { onChange(this.model.count, this); }
        inc() { this.publish("counter", "inc"); }
    }
    return { Counter, CounterView };
});
