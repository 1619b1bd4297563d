"""A window that generates fake kanji from any GANji checkpoint (VAE, GAN or DDPM), and steers them from a kanji
you type: variations of it, completions around a part of it, a morph to a second one.

    python tkinter_gui.py                 # lists the pretrained models, then the checkpoints under runs/
    python tkinter_gui.py --runs other/   # or under another folder; "Open..." takes any file

Generation runs in a worker thread; the Tk main loop polls a queue, so the window never freezes.
"""
import argparse
import base64
import glob
import io
import os
import queue
import threading
import tkinter as tk
from tkinter import filedialog, ttk

import data
import ddpm
import sample

MODES = {"new": None, "variations": "like", "complete left": "left", "complete right": "right",
         "complete top": "top", "complete bottom": "bottom", "complete outside": "outside", "morph to": "to"}


def find_checkpoints(*folders):
    """[(path, 'kind  dataset  epochs / FID')] for every readable checkpoint under the folders, in that order;
    a file that another one's record names as its guide is that model's part, not a model of its own."""
    found, guides = [], set()
    for folder in folders:
        for path in sorted(glob.glob(os.path.join(folder, "**", "*.pt"), recursive=True)):
            try:
                ck = data.load_checkpoint(path, mmap=True)
            except data.GanjiError:
                continue
            dataset = os.path.basename(str(ck["config"]["dataset"]).rstrip("/"))
            record = ck.get("record") or {}  # slim files only
            if record.get("guide"):
                guides.add(os.path.normpath(os.path.join(os.path.dirname(path), record["guide"]["file"])))
            epochs = record.get("epochs", ck.get("epoch"))
            note = f"FID {record['evaluate']['fid']:.1f}" if record.get("evaluate") else f"epoch {epochs}"
            found.append((path, f"{ck['kind']:<5} {dataset:<8} {note:<10} {os.path.relpath(path)}"))
    return [(p, label) for p, label in found if os.path.normpath(p) not in guides]


class App:
    def __init__(self, root, runs_dir="runs", pretrained_dir=sample.PRETRAINED, data_dir="data"):
        self.root, self.runs_dir, self.pretrained_dir, self.data_dir = root, runs_dir, pretrained_dir, data_dir
        self.jobs = queue.Queue()   # worker -> UI messages: ("progress", i, total) | ("done", ...) | ("error", msg)
        self.models = {}            # path -> (module, net, cfg), loaded once
        self.paths, self.busy, self.png, self.images, self.after_id = [], False, None, None, None
        self.device = data.pick_device("auto")
        root.title("GANji: fake kanji generator")

        left = ttk.Frame(root, padding=8)
        left.grid(row=0, column=0, sticky="ns")
        ttk.Label(left, text=f"Pretrained models, then checkpoints under {runs_dir}/").pack(anchor="w")
        self.listbox = tk.Listbox(left, width=58, height=10, font="TkFixedFont", exportselection=False)
        self.listbox.pack(fill="y", expand=True)
        self.listbox.bind("<<ListboxSelect>>", lambda e: self.show_record())
        row = ttk.Frame(left)
        row.pack(fill="x", pady=4)
        ttk.Button(row, text="Open...", command=self.open_file).pack(side="left")
        ttk.Button(row, text="Refresh", command=self.refresh).pack(side="left", padx=4)

        steer = ttk.LabelFrame(left, text="Steer from a kanji you type (DDPM; VAE: variations, morph)", padding=6)
        steer.pack(fill="x", pady=4)
        self.mode = tk.StringVar(value="new")
        self.kanji, self.kanji_to = tk.StringVar(value="海"), tk.StringVar(value="林")
        self.strength = tk.DoubleVar(value=ddpm.STRENGTH)
        ttk.Label(steer, text="Mode").grid(row=0, column=0, sticky="w")
        ttk.Combobox(steer, textvariable=self.mode, values=list(MODES), width=16, state="readonly").grid(
            row=0, column=1, sticky="w")
        ttk.Label(steer, text="Kanji").grid(row=1, column=0, sticky="w")
        ttk.Entry(steer, textvariable=self.kanji, width=4, font=("TkDefaultFont", 16)).grid(row=1, column=1,
                                                                                            sticky="w")
        ttk.Label(steer, text="morph to").grid(row=1, column=2, sticky="e")
        ttk.Entry(steer, textvariable=self.kanji_to, width=4, font=("TkDefaultFont", 16)).grid(row=1, column=3)
        ttk.Label(steer, text="Strength").grid(row=2, column=0, sticky="w")
        shown = tk.StringVar(value=f"{ddpm.STRENGTH:.2f}")
        ttk.Scale(steer, from_=0.05, to=1.0, variable=self.strength, length=180,
                  command=lambda v: shown.set(f"{float(v):.2f}")).grid(row=2, column=1, columnspan=2, sticky="w")
        ttk.Label(steer, textvariable=shown, width=5).grid(row=2, column=3)

        opts = ttk.LabelFrame(left, text="Options", padding=6)
        opts.pack(fill="x", pady=4)
        self.seed = tk.IntVar(value=0)
        self.sampler = tk.StringVar(value=ddpm.SAMPLER)
        self.steps = tk.IntVar(value=ddpm.STEPS)
        ttk.Label(opts, text="Seed").grid(row=0, column=0, sticky="w")
        ttk.Spinbox(opts, from_=0, to=2**31 - 1, textvariable=self.seed, width=10).grid(row=0, column=1, sticky="w")
        ttk.Button(opts, text="Next seed", command=lambda: self.seed.set(self.seed.get() + 1)).grid(row=0, column=2)
        ttk.Label(opts, text="DDPM sampler").grid(row=1, column=0, sticky="w")
        ttk.Combobox(opts, textvariable=self.sampler, values=ddpm.SAMPLERS, width=10,
                     state="readonly").grid(row=1, column=1, sticky="w")
        ttk.Label(opts, text="DDPM steps").grid(row=2, column=0, sticky="w")
        ttk.Spinbox(opts, from_=1, to=1000, textvariable=self.steps, width=10).grid(row=2, column=1, sticky="w")
        self.guided = tk.BooleanVar(value=True)  # autoguidance by the guide a DDPM's record names
        self.guidance = tk.DoubleVar(value=ddpm.GUIDANCE)
        ttk.Checkbutton(opts, text="DDPM guide", variable=self.guided).grid(row=3, column=0, sticky="w")
        ttk.Spinbox(opts, from_=1, to=10, increment=0.25, textvariable=self.guidance, width=10).grid(
            row=3, column=1, sticky="w")
        ttk.Label(opts, text="(if its record names one)").grid(row=3, column=2, sticky="w")

        buttons = ttk.Frame(left)
        buttons.pack(fill="x", pady=4)
        self.generate_button = ttk.Button(buttons, text="Generate Kanji", command=self.generate)
        self.generate_button.pack(side="left")
        self.morph_button = ttk.Button(buttons, text="Morph", command=lambda: self.generate(morph=True))
        self.morph_button.pack(side="left", padx=4)
        ttk.Button(buttons, text="Save PNG...", command=self.save_png).pack(side="left")
        self.font_button = ttk.Button(buttons, text="Save as font...", command=self.save_font)
        self.font_button.pack(side="left", padx=4)
        self.progress = ttk.Progressbar(left, mode="determinate", maximum=1.0)
        self.progress.pack(fill="x", pady=4)
        self.status = tk.StringVar(value="Pick a checkpoint, then Generate Kanji.")
        ttk.Label(left, textvariable=self.status, wraplength=420, foreground="#333").pack(anchor="w")
        self.record = tk.StringVar()  # the selected model: what it is, its training time, scores, last command
        ttk.Label(left, textvariable=self.record, wraplength=420, foreground="#555",
                  font="TkSmallCaptionFont").pack(anchor="w", pady=4)

        right = ttk.Frame(root, padding=8)
        right.grid(row=0, column=1, sticky="nsew")
        self.source_view = ttk.Label(right, background="white")  # the typed glyph(s) the grid was steered from
        self.source_view.pack(side="left", anchor="n", padx=(0, 8))
        self.view = ttk.Label(right, background="white")
        self.view.pack(side="left", anchor="n")
        root.columnconfigure(1, weight=1)
        root.rowconfigure(0, weight=1)
        self.refresh()
        root.after(50, self.poll)
        if self.paths:  # load the selected model and warm its kernels up while the user looks at the window
            threading.Thread(target=self.preload, args=(self.paths[self.listbox.curselection()[0]],),
                             daemon=True).start()

    def preload(self, path):
        """Load a model, run one step on a grid's worth of images and draw it (importing torchvision's grid code
        takes seconds): the first "Generate Kanji" is then as fast as the next."""
        try:
            mod, net, cfg = self.load("auto", path)
            guide_path = sample.recorded_guide(path)[0]
            if guide_path:
                self.load("ddpm", guide_path)
            self.to_png(sample.generate(mod, net, cfg, 16, 4, 0, self.device, steps=1), cfg["display_invert"])
        except Exception:
            pass  # a broken file says so when the user generates from it

    # -- checkpoint list
    def refresh(self):
        self.listbox.delete(0, "end")
        self.paths = []
        for path, label in find_checkpoints(self.pretrained_dir, self.runs_dir):
            self.add(path, label)
        default = os.path.join(self.pretrained_dir, "ddpm_kanji.pt")
        if self.paths:
            self.listbox.selection_set(self.paths.index(default) if default in self.paths else 0)
        self.show_record()

    def show_record(self):
        """The selected model's record, and the sampler, steps and guidance it recommends."""
        sel = self.listbox.curselection()
        try:
            self.record.set(sample.describe(self.paths[sel[0]], brief=True) if sel else "")
            if sel and data.load_checkpoint(self.paths[sel[0]], mmap=True)["kind"] == "ddpm":
                how = sample.recommended(self.paths[sel[0]])
                self.sampler.set(how["sampler"])
                self.steps.set(how["steps"])
                self.guidance.set(how["guidance"] or ddpm.GUIDANCE)
        except data.GanjiError as e:
            self.record.set(str(e))

    def add(self, path, label):
        self.paths.append(path)
        self.listbox.insert("end", label)

    def select(self, path):
        """Select path in the list, adding it first if it is not there (what "Open..." does)."""
        path = os.path.abspath(path)
        known = [os.path.abspath(p) for p in self.paths]
        if path not in known:
            self.add(path, f"{'file':<5} {'':<10} {'':<10} {path}")
            known.append(path)
        self.listbox.selection_clear(0, "end")
        self.listbox.selection_set(known.index(path))
        self.show_record()

    def open_file(self):
        path = filedialog.askopenfilename(title="Open a GANji checkpoint",
                                          filetypes=[("PyTorch checkpoint", "*.pt"), ("All files", "*")])
        if path:
            self.select(path)

    # -- generation (worker thread) and display (UI thread)
    def generate(self, morph=False):
        if self.busy:
            return
        sel = self.listbox.curselection()
        if not sel:
            self.status.set("Pick a checkpoint first (or Open... one).")
            return
        try:
            seed, steps = int(self.seed.get()), int(self.steps.get())
            guidance = float(self.guidance.get()) if self.guided.get() else 1.0
            strength = float(self.strength.get())
        except (tk.TclError, ValueError):
            self.status.set("Seed and steps must be whole numbers, the guidance a number.")
            return
        if guidance < 1:
            self.status.set("The guidance must be at least 1 (1 = unguided).")
            return
        mode = "new" if morph else self.mode.get()
        steering = {}
        if MODES[mode] == "like":
            steering = {"like": self.kanji.get().strip(), "strength": strength}
        elif MODES[mode] == "to":
            steering = {"source": self.kanji.get().strip(), "to": self.kanji_to.get().strip()}
        elif MODES[mode]:
            steering = {"source": self.kanji.get().strip(), "keep": MODES[mode]}
        self.busy = True
        self.progress["value"] = 0
        self.status.set("Morphing..." if morph else "Generating...")
        args = (self.paths[sel[0]], seed, self.sampler.get(), max(1, steps), morph, guidance, steering)
        threading.Thread(target=self.work, args=args, daemon=True).start()

    def load(self, kind, path):
        if path not in self.models:
            self.models[path] = sample.load_any(kind, path, self.device)
        return self.models[path]

    def work(self, path, seed, sampler, steps, morph, guidance, steering):
        try:
            mod, net, cfg = self.load("auto", path)
            guide_path, _, min_t = sample.recorded_guide(path) if mod.KIND == "ddpm" else (None,) * 3
            guided = sample.load_guide(guide_path, guidance, mod, cfg, load=self.load, min_t=min_t) \
                if guide_path and guidance > 1 else {}
            progress = lambda i, total: self.jobs.put(("progress", i, total))
            sources = None
            if morph:  # 16 cells, each morphing through 12 frames
                x = sample.generate(mod, net, cfg, 16 * 12, 12, seed, self.device, True, progress,
                                    sampler="ddim" if sampler == "ancestral" else sampler, steps=min(steps, 20),
                                    **guided)
                frames = [x.view(16, 12, *x.shape[1:])[:, k] for k in range(12)]
            elif steering:
                sample.check_steering(mod.KIND, interpolate="to" in steering, **steering)
                x, sources = sample.steer(mod, net, cfg, 16, seed, self.device, data_dir=self.data_dir,
                                          progress=progress, sampler=sampler, steps=steps, **guided, **steering)
                frames = [x]
            else:
                frames = [sample.generate(mod, net, cfg, 16, 4, seed, self.device, False, progress,
                                          sampler=sampler, steps=steps, eta=0.0, **guided)]
            pngs = [self.to_png(f, cfg["display_invert"]) for f in frames]
            source_png = self.to_png(sources, cfg["display_invert"], nrow=1, width=120) if sources is not None \
                else None
            how = f", guided by {os.path.basename(guide_path)} ({sample.guide_text(guidance, min_t)})" if guided else ""
            what = {"like": "variations", "keep": "completions", "to": "morph"}
            what = next((what[k] for k in what if k in steering), "")
            self.jobs.put(("done", pngs, source_png, frames[-1], cfg,
                           f"{mod.KIND} {what + ' ' if what else ''}from {path}, seed {seed}{how}"))
        except data.GanjiError as e:
            self.jobs.put(("error", str(e)))
        except Exception as e:  # shown in the window, never a crash
            self.jobs.put(("error", f"{type(e).__name__}: {e}"))

    @staticmethod
    def to_png(images, display_invert, nrow=4, width=520):
        from torchvision.utils import make_grid
        from PIL import Image

        grid = make_grid(data.to_picture(images, display_invert), nrow=nrow, padding=2,
                         pad_value=1.0 if display_invert else 0.0)
        arr = (grid.permute(1, 2, 0) * 255).round().byte().numpy()
        im = Image.fromarray(arr[..., 0] if images.shape[1] == 1 else arr)
        scale = max(1, round(width / im.width))  # about `width` px wide whatever the image size
        im = im.resize((im.width * scale, im.height * scale), Image.Resampling.NEAREST)
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return buf.getvalue()

    def poll(self):
        try:
            while True:
                msg = self.jobs.get_nowait()
                if msg[0] == "progress":
                    self.progress["value"] = msg[1] / msg[2]
                elif msg[0] == "done":
                    self.busy = False
                    self.progress["value"] = 1.0
                    self.images, self.images_cfg = msg[3], msg[4]
                    self.show(msg[1])
                    self.source_photo = tk.PhotoImage(data=base64.b64encode(msg[2])) if msg[2] else ""
                    self.source_view.configure(image=self.source_photo)
                    self.status.set(f"Showing {msg[5]}.")
                elif msg[0] == "font":
                    self.busy = False
                    self.status.set(msg[1])
                else:
                    self.busy = False
                    self.progress["value"] = 0
                    self.status.set(f"Error: {msg[1]}")
        except queue.Empty:
            pass
        self.root.after(50, self.poll)

    def show(self, pngs, k=0):
        """Show one PNG, or loop through morph frames forth and back at 8 frames/s."""
        if self.after_id:
            self.root.after_cancel(self.after_id)
            self.after_id = None
        order = list(range(len(pngs))) + list(range(len(pngs) - 2, 0, -1))
        self.png = pngs[order[k % len(order)]]
        self.photo = tk.PhotoImage(data=base64.b64encode(self.png))
        self.view.configure(image=self.photo)
        if len(pngs) > 1:
            self.after_id = self.root.after(125, self.show, pngs, k + 1)

    def save_png(self):
        if not self.png:
            self.status.set("Nothing generated yet.")
            return
        path = filedialog.asksaveasfilename(defaultextension=".png", filetypes=[("PNG", "*.png")])
        if path:
            with open(path, "wb") as f:
                f.write(self.png)
            self.status.set(f"Saved {path}")

    def save_font(self, path=None):
        """Write the glyphs of the grid shown as an OpenType font (Private Use Area from U+E000), in the worker."""
        if self.images is None or self.busy:
            self.status.set("Generate a grid first: its glyphs become the font.")
            return
        path = path or filedialog.asksaveasfilename(defaultextension=".otf", filetypes=[("OpenType font", "*.otf")])
        if not path:
            return
        model = self.paths[self.listbox.curselection()[0]] if self.listbox.curselection() else "unknown"
        self.busy = True
        self.status.set("Writing the font...")

        def work():
            import font
            try:
                report = font.write_font(self.images, self.images_cfg, path, "GANji Fake Kanji",
                                         os.path.basename(model))
                self.jobs.put(("font", f"Saved {path}: {font.summary(report)}"))
            except data.GanjiError as e:
                self.jobs.put(("error", str(e)))
            except Exception as e:
                self.jobs.put(("error", f"{type(e).__name__}: {e}"))

        threading.Thread(target=work, daemon=True).start()


def get_parser():
    p = argparse.ArgumentParser(description="A window that samples and steers any GANji checkpoint.")
    p.add_argument("--runs", default="runs", help="folder searched for checkpoints (default: %(default)s)")
    p.add_argument("--data-dir", default="data", help="kanji render cache for typed kanji (default: %(default)s)")
    return p


def main(argv=None):
    args = get_parser().parse_args(argv)
    root = tk.Tk()
    App(root, args.runs, data_dir=args.data_dir)
    root.mainloop()


if __name__ == "__main__":
    data.cli(main)
