"""A small chat box for Jupyter: attach an image, type a question, watch the answer stream in.

    from phi_helpers.tutorial.widgets import chat_box
    chat_box(model, processor)            # the last line of a cell: the box appears below it

or, to drive it from code as well (this is how it is tested, no browser needed)::

    from phi_helpers.tutorial.widgets import ChatBox
    box = ChatBox(model, processor, max_new_tokens=256)
    box                                   # shows the widget
    box.upload(open("images/receipt.png", "rb").read(), name="receipt.png")
    box.send("What is the total?")        # same as typing it and pressing Send
    box.drop_images()                     # same as pressing Drop old images
    box.reset()                           # same as pressing Reset

The buttons only call ``send``, ``upload``, ``drop_images`` and ``reset``. Problems (an unreadable file,
a conversation too long for the context, ...) are written into the answer area as a short message,
never a traceback, and a question that was not answered (an error, or the kernel's stop button before
the answer began) stays in the text box so you can edit it and press Send again.

Needs ``ipywidgets`` (``pip install ipywidgets``); JupyterLab 4 shows the widgets out of the box.
"""

import datetime
import html
import io

from PIL import Image

from ..api.choices import ASK_MAX_NEW_TOKENS
from ..api.generation import stream_chunks
from ..api.images import decode_bytes
from ..api.prompts import Chat
from ..errors import ContextLengthError, MissingDependencyError, check_whole_number
from ..models.phi3_v.image_processing_phi3_v import hd_canvas_size

try:
    import ipywidgets as widgets
except ImportError as error:  # pragma: no cover - depends on the environment
    raise MissingDependencyError(
        "phi_helpers.tutorial.widgets needs ipywidgets: `pip install ipywidgets` (then restart the kernel)."
    ) from error

THUMBNAIL_SIZE = 120  # pixels, the longer side of an attached image's preview
EMPTY_QUESTION = "Type a question first, then press Send.\n"  # a hint, gone once a question is sent


def chat_box(model, processor, max_new_tokens: int = ASK_MAX_NEW_TOKENS, system: str | None = None) -> widgets.Widget:
    """Return the chat box widget (put it on the last line of a cell to show it).

    Use :class:`ChatBox` instead if you also want to call ``send`` / ``upload`` / ``reset`` from code.
    """
    return ChatBox(model, processor, max_new_tokens=max_new_tokens, system=system).widget


class ChatBox:
    """The chat box's state and actions; ``.widget`` is what is displayed.

    Args:
        model, processor: what ``load_model()`` returned.
        max_new_tokens: the longest answer, in tokens.
        system: an optional system message for the conversation.
        stream_fn: the function that streams an answer (default ``phi_helpers.api.generation.stream_chunks``;
            tests pass a fake with the same signature).

    Attributes:
        history: the answered turns, a list of ``(question, images, answer)``; every question is sent
            with this whole history, images included.
        pending_images: images uploaded since the last question; they go with the next one.
    """

    def __init__(
        self, model, processor, max_new_tokens: int = ASK_MAX_NEW_TOKENS, system: str | None = None, stream_fn=stream_chunks
    ):
        self.model = model
        self.processor = processor
        self.max_new_tokens = max_new_tokens
        self.system = system
        self._stream = stream_fn
        self.history: list[tuple[str, list, str]] = []
        self.pending_images: list[tuple[str, Image.Image]] = []
        self._build_widgets()

    # --- what the buttons do ---------------------------------------------------------------------

    def upload(self, data: bytes, name: str | None = None) -> bool:
        """Attach an image (the file's bytes; ``name``, the file's name, is shown) to the next question.
        Returns False if it cannot be read."""
        try:  # read as load_image reads bytes, with messages that speak of the uploaded file
            image = decode_bytes(bytes(data), f"the uploaded file '{name}'" if name else "the uploaded file")
            self._check_shape(image)
        except Exception as error:  # noqa: BLE001  (any failure becomes a message, not a traceback)
            self._write_error(f"Not attached: {error}")
            return False
        self.pending_images.append((name or "image", image))
        self._show_pending()
        return True

    def send(self, text: str | None = None) -> str | None:
        """Ask ``text`` (default: what is in the text box) with the attached images; stream the answer.

        Returns the answer, or ``None`` if there is none (an empty question, an error, or the kernel's
        stop button before the answer began): the message is shown in the answer area and the question
        stays in the text box.
        """
        if text is not None:
            self.text.value = text
        question = self.text.value
        if not question.strip():
            self._write_error(EMPTY_QUESTION)
            return None
        self._remove_text(EMPTY_QUESTION)  # the hint was followed
        images = [image for _, image in self.pending_images]
        try:
            chat = self._chat_with(question, images)
        except Exception as error:  # noqa: BLE001
            self._write_error(f"Not sent: {error}")
            return None
        self._write(f"You: {question}{_image_note([name for name, _ in self.pending_images])}\nPhi: ")
        self._set_busy(True)
        try:
            answer = self._stream_answer(chat)
        except Exception as error:  # noqa: BLE001
            self._write_error(f"\nNot answered: {error}{self._advice(error)}\nYour question is still in the text box; change it or press Send to retry.")
            return None
        finally:
            self._set_busy(False)
        if answer is None:  # stopped before the first piece: nothing to keep
            self._write_error("Your question is still in the text box; press Send to ask it again.")
            return None
        self.history.append((question, images, answer))
        self.pending_images = []
        self._show_pending()
        self.text.value = ""
        return answer

    def drop_images(self, keep_last: int = 1) -> int:
        """Remove all but the last ``keep_last`` images from the history (as ``Chat.drop_images``; the
        images attached to your next question stay); return how many were removed.

        Every question is sent with the whole history, images included, so this is what makes a
        conversation that became too long for the context (or slow) fit again without a Reset: the
        text of every turn stays.
        """
        keep_last = check_whole_number(keep_last, "keep_last")
        to_drop = max(sum(len(images) for _, images, _ in self.history) - keep_last, 0)
        remaining = to_drop
        history = []
        for question, images, answer in self.history:  # oldest first
            removed = min(remaining, len(images))
            history.append((question, images[removed:], answer))
            remaining -= removed
        self.history = history
        if to_drop:
            self._write(f"[{to_drop} old image(s) removed from the conversation; its text stays]\n\n")
        else:  # pressed again, or nothing older than the newest image(s) to keep
            self._write("[No old images to remove]\n\n")
        return to_drop

    def reset(self) -> None:
        """Start a new conversation: forget the history and the attached images, clear the answer area."""
        self.history = []
        self.pending_images = []
        self.output.outputs = ()
        self._show_pending()

    # --- helpers -----------------------------------------------------------------------------------

    @property
    def chat(self) -> Chat:
        """The conversation so far as a ``phi_helpers.Chat``: a copy, built afresh from ``history`` each
        time you read it, so changing it (``box.chat.drop_images()``...) does not change the box; use
        ``box.drop_images()`` and ``box.reset()`` for that."""
        chat = Chat(system=self.system)
        for question, images, answer in self.history:
            chat.add_user(question, images=images)
            chat.add_assistant(answer, generated=True)
        return chat

    def transcript(self) -> str:
        """Everything written into the answer area, as plain text."""
        return "".join(output.get("text", "") for output in self.output.outputs)

    def _check_shape(self, image) -> None:
        """ImageAspectRatioError for an image too long and thin for the processor's num_crops: refused when it
        is uploaded, since the box sends every image again with each question (and has no num_crops to raise)."""
        hd_canvas_size(image.width, image.height, self.processor.image_processor.num_crops)

    def _chat_with(self, question: str, images: list) -> Chat:
        """The history plus the new question; the history itself changes only once an answer arrives."""
        return self.chat.add_user(question, images=images)

    def _advice(self, error: Exception) -> str:
        """What helps in this box when the conversation is too long (the error names ``chat`` methods)."""
        if not isinstance(error, ContextLengthError) or not any(images for _, images, _ in self.history):
            return ""
        return (
            "\nIn this box: press Drop old images (box.drop_images(), which keeps the newest image of the "
            "conversation and all its text) or Reset (start over); box.chat is a copy, so changing it changes nothing."
        )

    def _stream_answer(self, chat: Chat) -> str | None:
        """Write the answer piece by piece into the answer area and return it (None if the kernel's stop
        button came before the first piece)."""
        pieces = []
        chunks = None  # the stop button can come before the stream exists, while the images are prepared
        try:
            chunks = self._stream(self.model, self.processor, chat, max_new_tokens=self.max_new_tokens)
            for piece in chunks:
                pieces.append(piece)
                self._write(piece)
        except KeyboardInterrupt:  # the kernel's stop button: keep what was generated
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
            self._write(" [stopped]")
            if not pieces:
                self._write("\n")
                return None
        self._write("\n\n")
        return "".join(pieces).strip()

    def _build_widgets(self) -> None:
        self._mirroring = False
        self.uploader = widgets.FileUpload(accept="image/*", multiple=False, description="Attach image")
        self.status = widgets.HTML(value=_pending_text([]))
        self.preview = widgets.HBox([])
        self.text = widgets.Textarea(
            placeholder="Ask about the image, then press Send", rows=2, layout=widgets.Layout(width="100%")
        )
        self.send_button = widgets.Button(description="Send", button_style="primary", icon="paper-plane")
        self.drop_button = widgets.Button(
            description="Drop old images", tooltip="Keep the text and only the newest image of the conversation",
            icon="compress",
        )
        self.reset_button = widgets.Button(description="Reset", tooltip="Start a new conversation", icon="refresh")
        self.output = widgets.Output(
            layout=widgets.Layout(border="1px solid #ccc", padding="4px", max_height="400px", overflow="auto")
        )
        self.uploader.observe(self._on_upload, names="value")
        self.send_button.on_click(lambda _button: self.send())
        self.drop_button.on_click(lambda _button: self.drop_images())
        self.reset_button.on_click(lambda _button: self.reset())
        self.widget = widgets.VBox([
            widgets.HBox([self.uploader, self.status]),
            self.preview,
            self.text,
            widgets.HBox([self.send_button, self.drop_button, self.reset_button]),
            self.output,
        ])

    def _on_upload(self, change) -> None:
        """The browser replaced the upload button's value with the file(s) just chosen: attach them."""
        if self._mirroring:
            return  # our own write of the attached images below
        for file in change["new"]:
            self.upload(bytes(file["content"]), name=file.get("name"))
        self._show_pending()

    def _show_pending(self) -> None:
        names = [name for name, _ in self.pending_images]
        self.status.value = _pending_text(names)
        self.preview.children = [
            widgets.Image(value=_thumbnail_png(image), format="png") for _, image in self.pending_images
        ]
        # The browser labels the button "Attach image (N)" with N = len(uploader.value). The browser
        # sets the value to the newly chosen file only, so the kernel writes one entry per attached
        # image back (names only, no content: nothing is sent twice); N is then the real count.
        self._mirroring = True
        try:
            self.uploader.value = tuple(_file_entry(name) for name in names)
        finally:
            self._mirroring = False

    def _set_busy(self, busy: bool) -> None:
        self.send_button.disabled = busy
        self.drop_button.disabled = busy
        self.reset_button.disabled = busy
        self.send_button.description = "Thinking..." if busy else "Send"

    def _write(self, text: str) -> None:
        self._append("stdout", text)

    def _write_error(self, text: str) -> None:
        self._append("stderr", text.rstrip("\n") + "\n")

    def _remove_text(self, text: str) -> None:
        """Take every ``text`` out of the messages in the answer area (the answers are left as they are)."""
        outputs = [{**output, "text": output["text"].replace(text, "")} if output.get("name") == "stderr" else output
                   for output in self.output.outputs]
        self.output.outputs = tuple(output for output in outputs if output["text"])

    def _append(self, stream: str, text: str) -> None:
        """Add text to the answer area, merged into the last piece when it is the same kind."""
        outputs = list(self.output.outputs)
        if outputs and outputs[-1].get("output_type") == "stream" and outputs[-1].get("name") == stream:
            outputs[-1] = {**outputs[-1], "text": outputs[-1]["text"] + text}
        else:
            outputs.append({"output_type": "stream", "name": stream, "text": text})
        self.output.outputs = tuple(outputs)

    def _repr_mimebundle_(self, **kwargs):
        """Show the widget when a ChatBox is the last expression of a cell."""
        return self.widget._repr_mimebundle_(**kwargs)


def _file_entry(name: str) -> dict:
    """An upload-button value entry that stands for an attached image (the browser only counts them)."""
    epoch = datetime.datetime.fromtimestamp(0, tz=datetime.timezone.utc)
    return {"name": name, "type": "", "size": 0, "content": memoryview(b""), "last_modified": epoch}


def _pending_text(names: list[str]) -> str:
    if not names:
        return "<i>No image attached. Attach one to ask about it (it goes with your next question).</i>"
    return f"Attached to your next question: {html.escape(', '.join(names))}"


def _image_note(names: list[str]) -> str:
    return f"  [with {', '.join(names)}]" if names else ""


def _thumbnail_png(image: Image.Image) -> bytes:
    small = image.copy()
    small.thumbnail((THUMBNAIL_SIZE, THUMBNAIL_SIZE))
    buffer = io.BytesIO()
    small.save(buffer, format="PNG")
    return buffer.getvalue()


__all__ = ["chat_box", "ChatBox"]
