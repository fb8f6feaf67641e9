"""Generate the text pools TEXT SPAN searches: descriptions.txt, words.txt and toy.txt (one text per line).

    python data/pools/make_pools.py [--out DIR]      # default: next to this script

Deterministic: no randomness, only fixed vocabularies and templates (and, for words.txt, the pinned
``wordfreq`` package). ``tests/test_pools.py`` regenerates the files and compares them byte for byte.

* descriptions: short image descriptions in the style the paper's pool uses ("A semicircular
  arch", "Picture taken in Cyprus", "Image with a red color"), built from this project's own
  vocabularies of objects, animals, places, countries, colours, shapes, textures, materials, counts,
  letters, art styles, emotions, people, actions, weather, times of day and photographic qualities.
* words: the most common English words (``wordfreq.top_n_list("en", ...)``), ASCII letters only,
  without single letters other than "a" and "i" (fragments such as "s" from "it's") and without a
  short list of profanity, cut at ``N_WORDS``.
* toy: descriptions of the toy world (``clipdecomp.toy.ATTRIBUTES``: shapes, colours, positions,
  sizes, backgrounds, the round/angular label) plus about 30% distractors the toy world never shows.
"""

from __future__ import annotations

import argparse
from pathlib import Path

N_WORDS = 3_500
PROFANITY = {
    "fuck",
    "fucking",
    "fucked",
    "shit",
    "bullshit",
    "ass",
    "asshole",
    "bitch",
    "dick",
    "porn",
    "crap",
    "damn",
}

OBJECTS = """bicycle car bus train airplane boat chair table lamp clock book cup bottle umbrella guitar
piano violin phone laptop camera key hat shoe backpack kite ball bridge tower arch fountain statue
lighthouse windmill castle church temple tent fence door window staircase tunnel road mountain river
lake waterfall tree flower cactus mushroom apple banana pineapple candle mirror ladder basket bucket
hammer envelope flag balloon crown necklace watch map globe telescope microscope robot rocket
satellite tractor helicopter motorcycle skateboard surfboard sofa bed bathtub sink oven refrigerator
teapot vase painting poster mailbox bench swing wheel anchor shield sword drum trumpet doll puzzle
chessboard coin wallet suitcase pillow blanket towel plate fork spoon knife bowl jar box barrel
bridge_of_stone traffic_light fire_hydrant street_lamp park_bench hot_air_balloon""".split()

ANIMALS = """dog cat horse cow sheep goat pig chicken duck owl eagle parrot penguin flamingo swan pigeon
fish shark whale dolphin octopus crab turtle frog snake lizard crocodile lion tiger leopard cheetah
bear panda wolf fox deer rabbit squirrel mouse elephant giraffe zebra camel kangaroo koala monkey
gorilla butterfly bee spider ladybug snail""".split()

PLACES = [
    "in a kitchen",
    "in a bedroom",
    "in a living room",
    "in an office",
    "in a classroom",
    "in a library",
    "in a hospital",
    "in a restaurant",
    "in a supermarket",
    "at an airport",
    "at a train station",
    "in a subway",
    "in a parking lot",
    "on a busy street",
    "on a highway",
    "in a big city",
    "in a small village",
    "on a farm",
    "in a forest",
    "in a jungle",
    "in a desert",
    "at the beach",
    "on the open ocean",
    "on a tropical island",
    "on a mountain top",
    "in a valley",
    "in a canyon",
    "in a cave",
    "on a glacier",
    "in a snowy field",
    "in a meadow",
    "in a garden",
    "in a park",
    "at a playground",
    "in a stadium",
    "at a swimming pool",
    "in a gym",
    "in a museum",
    "inside a church",
    "in a market",
    "in a harbor",
    "on a river bank",
    "by a lake",
    "near a waterfall",
    "near a volcano",
    "in the savanna",
    "in a swamp",
    "in a vineyard",
    "in a rice field",
    "in a factory",
    "at a construction site",
    "in a bakery",
    "at a zoo",
    "in an aquarium",
    "at a concert",
    "at a wedding",
    "in a laboratory",
    "in a theater",
    "under water",
    "in outer space",
]

COUNTRIES = [
    "Cyprus",
    "Greece",
    "Italy",
    "France",
    "Spain",
    "Portugal",
    "Germany",
    "the Netherlands",
    "Belgium",
    "Switzerland",
    "Austria",
    "Poland",
    "Norway",
    "Sweden",
    "Finland",
    "Denmark",
    "Iceland",
    "Ireland",
    "Scotland",
    "England",
    "Russia",
    "Ukraine",
    "Turkey",
    "Egypt",
    "Morocco",
    "Kenya",
    "Tanzania",
    "Nigeria",
    "Ghana",
    "Ethiopia",
    "South Africa",
    "Madagascar",
    "India",
    "Nepal",
    "China",
    "Japan",
    "South Korea",
    "Vietnam",
    "Thailand",
    "Cambodia",
    "Indonesia",
    "the Philippines",
    "Malaysia",
    "Australia",
    "New Zealand",
    "Canada",
    "the United States",
    "Mexico",
    "Cuba",
    "Jamaica",
    "Brazil",
    "Argentina",
    "Chile",
    "Peru",
    "Colombia",
    "Bolivia",
    "Ecuador",
    "Venezuela",
    "Israel",
    "Jordan",
    "Lebanon",
    "Iran",
    "Iraq",
    "Saudi Arabia",
    "the United Arab Emirates",
    "Qatar",
    "Pakistan",
    "Bangladesh",
    "Sri Lanka",
    "Mongolia",
    "Kazakhstan",
    "Uzbekistan",
    "Georgia",
    "Armenia",
    "Croatia",
    "Serbia",
    "Hungary",
    "the Czech Republic",
    "Romania",
    "Bulgaria",
    "Tunisia",
    "Algeria",
    "Senegal",
    "Fiji",
    "Costa Rica",
    "Guatemala",
    "Panama",
    "Malta",
    "Estonia",
    "Lithuania",
]

CITIES = [
    "Paris",
    "London",
    "Tokyo",
    "New York",
    "Rome",
    "Venice",
    "Istanbul",
    "Cairo",
    "Mumbai",
    "Beijing",
    "Hong Kong",
    "Rio de Janeiro",
    "Sydney",
    "Moscow",
    "Berlin",
    "Amsterdam",
    "Barcelona",
    "Dubai",
    "Bangkok",
    "Mexico City",
    "San Francisco",
    "Los Angeles",
    "Chicago",
    "Toronto",
    "Buenos Aires",
    "Lisbon",
    "Prague",
    "Vienna",
    "Athens",
    "Jerusalem",
    "Seoul",
    "Singapore",
    "Kyoto",
    "Marrakesh",
    "Havana",
    "Cape Town",
    "Nairobi",
    "Lima",
    "Stockholm",
    "Dublin",
]

COLOURS = [
    "red",
    "orange",
    "yellow",
    "green",
    "blue",
    "purple",
    "pink",
    "brown",
    "black",
    "white",
    "grey",
    "gold",
    "silver",
    "beige",
    "turquoise",
    "navy blue",
    "teal",
    "magenta",
    "maroon",
    "olive green",
    "lavender",
    "crimson",
    "cyan",
    "violet",
    "ivory",
    "bronze",
    "coral",
    "mint green",
    "indigo",
    "emerald green",
]

SHAPES = [
    "semicircular arch",
    "circle",
    "square",
    "triangle",
    "rectangle",
    "star",
    "heart",
    "hexagon",
    "pentagon",
    "octagon",
    "spiral",
    "zigzag line",
    "oval",
    "diamond",
    "cross",
    "crescent",
    "arrow",
    "cube",
    "sphere",
    "cylinder",
    "cone",
    "pyramid",
    "ring",
    "wavy line",
    "grid",
    "dome",
    "curve",
    "straight line",
    "diagonal line",
    "checkerboard",
]

TEXTURES = [
    "striped",
    "checkered",
    "polka-dotted",
    "floral",
    "plaid",
    "furry",
    "fluffy",
    "rough",
    "smooth",
    "shiny",
    "glossy",
    "matte",
    "wrinkled",
    "cracked",
    "rusty",
    "woven",
    "knitted",
    "bumpy",
    "grainy",
    "scaly",
    "feathery",
    "spiky",
    "glittery",
    "marbled",
    "mossy",
    "sandy",
    "rippled",
    "porous",
    "velvety",
    "hairy",
]

MATERIALS = [
    "wood",
    "metal",
    "glass",
    "plastic",
    "stone",
    "brick",
    "concrete",
    "paper",
    "cardboard",
    "fabric",
    "leather",
    "wool",
    "silk",
    "cotton",
    "rubber",
    "ceramic",
    "clay",
    "marble",
    "gold",
    "silver",
    "steel",
    "copper",
    "ice",
    "sand",
    "porcelain",
]

NUMBERS = ["two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
PLURALS = [
    "dogs",
    "cats",
    "birds",
    "people",
    "cars",
    "trees",
    "apples",
    "chairs",
    "boats",
    "horses",
    "children",
    "flowers",
    "balloons",
    "candles",
    "coins",
    "houses",
    "stars",
    "windows",
]

SIGN_WORDS = [
    "STOP",
    "EXIT",
    "OPEN",
    "SALE",
    "HELLO",
    "WELCOME",
    "LOVE",
    "DANGER",
    "HOTEL",
    "TAXI",
    "POLICE",
    "CAFE",
    "PARKING",
    "BOOKS",
    "NEWS",
    "PHARMACY",
    "BAKERY",
    "FIRE",
    "FREE",
    "PUSH",
]
SCRIPTS = [
    "Latin",
    "Arabic",
    "Chinese",
    "Japanese",
    "Korean",
    "Cyrillic",
    "Greek",
    "Hebrew",
    "Devanagari",
    "Thai",
]
TEXT_THINGS = [
    "Handwritten text",
    "A page of a book",
    "A newspaper headline",
    "A neon sign",
    "Graffiti on a wall",
    "A license plate",
    "A street sign",
    "A restaurant menu",
    "A receipt",
    "A calendar",
    "A crossword puzzle",
    "A barcode",
    "A QR code",
    "A logo",
    "A road sign",
]

STYLES = [
    "oil painting",
    "watercolor painting",
    "pencil sketch",
    "charcoal drawing",
    "cartoon",
    "anime drawing",
    "comic strip",
    "pixel art image",
    "3D render",
    "digital illustration",
    "mosaic",
    "stained glass window",
    "engraving",
    "woodcut print",
    "pop art poster",
    "impressionist painting",
    "cubist painting",
    "surrealist painting",
    "abstract painting",
    "children's drawing",
    "tattoo design",
    "embroidery",
    "origami model",
    "clay sculpture",
    "marble sculpture",
    "graffiti mural",
    "collage",
    "blueprint",
    "X-ray image",
    "thermal image",
    "satellite image",
    "microscope image",
    "vintage photograph",
    "polaroid photo",
    "black and white photo",
    "sepia photo",
    "long exposure photo",
    "macro photo",
    "ink drawing",
    "paper cutout",
]

EMOTIONS = [
    "happy",
    "sad",
    "angry",
    "surprised",
    "scared",
    "calm",
    "excited",
    "bored",
    "tired",
    "proud",
    "confused",
    "lonely",
    "joyful",
    "anxious",
    "peaceful",
    "playful",
    "serious",
    "shy",
    "nervous",
    "relaxed",
]

PEOPLE = [
    "baby",
    "child",
    "teenager",
    "old man",
    "old woman",
    "young woman",
    "young man",
    "doctor",
    "nurse",
    "chef",
    "firefighter",
    "police officer",
    "soldier",
    "farmer",
    "fisherman",
    "athlete",
    "dancer",
    "musician",
    "singer",
    "painter",
    "student",
    "teacher",
    "scientist",
    "astronaut",
    "pilot",
    "clown",
    "bride",
    "businessman",
    "family",
    "crowd",
]

ACTIONS = [
    "running",
    "swimming",
    "cycling",
    "dancing",
    "cooking",
    "reading",
    "sleeping",
    "eating",
    "jumping",
    "climbing",
    "skiing",
    "surfing",
    "playing football",
    "playing tennis",
    "playing the guitar",
    "painting",
    "writing",
    "singing",
    "laughing",
    "crying",
    "walking a dog",
    "driving a car",
    "riding a horse",
    "fishing",
    "hiking",
    "skateboarding",
    "shopping",
    "talking on the phone",
    "taking a selfie",
    "gardening",
]

WEATHER = [
    "sunny",
    "rainy",
    "snowy",
    "foggy",
    "cloudy",
    "stormy",
    "windy",
    "misty",
    "hazy",
    "overcast",
    "icy",
    "hot",
    "cold",
    "humid",
    "freezing",
]
WEATHER_SCENES = [
    "A rainbow",
    "Lightning in the sky",
    "A tornado",
    "Falling snow",
    "Heavy rain",
    "A clear blue sky",
    "Dark storm clouds",
    "Raindrops on a window",
    "Frost on the grass",
    "A sandstorm",
]

TIMES = [
    "sunrise",
    "dawn",
    "morning",
    "noon",
    "afternoon",
    "sunset",
    "dusk",
    "evening",
    "night",
    "midnight",
    "twilight",
    "golden hour",
]
SEASONS = ["spring", "summer", "autumn", "winter"]

FOODS = [
    "pizza",
    "sushi",
    "pasta",
    "salad",
    "soup",
    "hamburgers",
    "ice cream",
    "chocolate",
    "coffee",
    "tea",
    "wine",
    "beer",
    "cheese",
    "bread",
    "croissants",
    "steak",
    "noodles",
    "rice",
    "curry",
    "tacos",
    "dumplings",
    "pancakes",
    "fruit",
    "vegetables",
    "cookies",
    "donuts",
    "sandwiches",
    "eggs",
    "salmon",
    "strawberries",
]

PHOTOGRAPHY = [
    "A blurry photo",
    "A bright photo",
    "A dark photo",
    "An overexposed photo",
    "A low-resolution image",
    "A high-contrast image",
    "A close-up photo",
    "An aerial view",
    "A photo taken from below",
    "A panoramic view",
    "A wide-angle shot",
    "A photo with a shallow depth of field",
    "A silhouette against the sky",
    "A reflection in water",
    "A shadow on the ground",
    "A backlit photo",
    "Soft natural light",
    "Harsh sunlight",
    "Candlelight",
    "Neon lights at night",
    "A photo taken through a window",
    "A cropped image",
    "A symmetrical composition",
    "A minimalist image",
    "A cluttered scene",
    "An empty room",
    "A crowded street",
    "A noisy image",
    "A photo with a vignette",
    "A tilted photo",
    "A mirror selfie",
    "A screenshot",
    "A scanned document",
    "A photo of a screen",
    "A thumbnail image",
    "A studio photo with a white background",
    "A product photo",
    "A selfie",
    "A group photo",
    "A portrait photo",
]


def article(phrase: str) -> str:
    """'a' or 'an' for a phrase (vowel letter rule, plus the vocabularies' one exception, "X-ray")."""
    return "an" if phrase[0].lower() in "aeiou" or phrase.startswith("X-") else "a"


def a(phrase: str) -> str:
    return f"{article(phrase)} {phrase}"


def cap(text: str) -> str:
    return text[0].upper() + text[1:]


def descriptions() -> list[str]:
    """~3,000 short image descriptions from the vocabularies above, grouped by topic."""
    objects = [o.replace("_", " ") for o in OBJECTS]
    out: list[str] = []
    for o in objects:
        out += [cap(a(o)), f"A photo of {a(o)}", f"A close-up of {a(o)}"]
    for x in ANIMALS:
        out += [f"A photo of {a(x)}", f"{cap(a(x))} in the wild", f"A cartoon {x}", f"A baby {x}"]
    for p in PLACES:
        out += [f"A photo taken {p}", f"A person {p}", f"An empty scene {p}"]
    for c in COUNTRIES:
        out += [
            f"Picture taken in {c}",
            f"A street in {c}",
            f"A landscape in {c}",
            f"A famous landmark in {c}",
            f"Traditional clothing from {c}",
        ]
    for c in CITIES:
        out += [f"A photo taken in {c}", f"The skyline of {c}", f"A street in {c}"]
    for i, c in enumerate(COLOURS):
        out += [
            f"Image with {a(c)} color",
            f"{cap(a(c))} object",
            f"{cap(a(c))} background",
            f"Mostly {c} tones",
            f"Something painted {c}",
        ]
        out += [f"{cap(a(c))} {objects[j]}" for j in range(i % 7, len(objects), 16)]
    for s in SHAPES:
        out += [cap(a(s)), f"An image with {a(s)} shape", f"{cap(a(s))} drawn on paper"]
    for t in TEXTURES:
        out += [f"{cap(a(t))} texture", f"{cap(a(t))} surface", f"A close-up of {a(t)} fabric"]
    for m in MATERIALS:
        out += [f"An object made of {m}", f"A sculpture made of {m}", f"A wall made of {m}"]
    for n in NUMBERS:
        out += [f"{cap(n)} {p}" for p in PLURALS]
        out += [f"An image with {n} objects", f"A group of {n} people"]
    for letter in "ABCDEFGHIJKLMNOPQRSTUVWXYZ":
        out += [f"The letter {letter}", f"A large letter {letter}"]
    for digit in range(10):
        out += [f"The number {digit}", f"A sign with the number {digit}"]
    for w in SIGN_WORDS:
        out += [f"A sign that says {w}", f"The word {w}"]
    for s in SCRIPTS:
        out += [f"Text written in {s} script", f"A sign in {s} letters"]
    out += TEXT_THINGS
    for i, s in enumerate(STYLES):
        out += [
            cap(a(s)),
            f"{cap(a(s))} of {a(ANIMALS[i % len(ANIMALS)])}",
            f"{cap(a(s))} of {a(objects[(3 * i) % len(objects)])}",
            f"{cap(a(s))} of {a(PEOPLE[i % len(PEOPLE)])}",
            f"{cap(a(s))} of a landscape",
        ]
    for e in EMOTIONS:
        out += [f"{cap(a(e))} person", f"{cap(a(e))} face", f"{cap(a(e))} child", f"A photo with {a(e)} mood"]
    for p in PEOPLE:
        out += [f"A photo of {a(p)}", f"A portrait of {a(p)}"]
    for x in ACTIONS:
        out += [f"A person {x}", f"People {x}", f"A child {x}"]
    for w in WEATHER:
        out += [f"{cap(a(w))} day", f"{cap(w)} weather", f"A landscape on {a(w)} day"]
    out += WEATHER_SCENES
    for t in TIMES:
        out += [f"A photo taken at {t}", f"A city at {t}", f"A beach at {t}", f"A landscape at {t}"]
    for s in SEASONS:
        out += [f"{cap(a(s))} landscape", f"A park in {s}", f"A photo taken in {s}"]
    for f in FOODS:
        out += [f"A plate of {f}", f"A photo of {f}", f"{cap(f)} on a table"]
    out += PHOTOGRAPHY
    return list(dict.fromkeys(out))


def words() -> list[str]:
    """The ``N_WORDS`` most common English words (wordfreq), filtered as the module docstring says."""
    import wordfreq

    kept = [
        w
        for w in wordfreq.top_n_list("en", 2 * N_WORDS)
        if w.isascii() and w.isalpha() and (len(w) > 1 or w in ("a", "i")) and w not in PROFANITY
    ]
    if len(kept) < N_WORDS:
        raise RuntimeError(f"wordfreq gave only {len(kept)} usable words; expected at least {N_WORDS}.")
    return kept[:N_WORDS]


TOY_DISTRACTORS = {
    "colour": ["pink", "brown", "black", "white", "grey", "cyan", "gold", "silver"],
    "shape": ["hexagon", "pentagon", "oval", "cross", "arrow", "crescent", "diamond", "spiral"],
    "object": ["dog", "cat", "car", "tree", "house", "face", "bird", "flower", "chair", "boat"],
    "background": [
        "forest",
        "desert",
        "a city street",
        "mountains",
        "the sky",
        "bricks",
        "a carpet",
        "metal",
        "clouds",
        "leaves",
    ],
    "text": ["the letter A", "the number 7", "a word", "a handwritten note"],
}


def toy() -> list[str]:
    """Descriptions of the toy world's attributes, then distractors it never shows (about 30%)."""
    from clipdecomp.toy import ATTRIBUTES

    shapes, colours, backgrounds = ATTRIBUTES["shape"], ATTRIBUTES["colour"], ATTRIBUTES["background"]
    out: list[str] = []
    for s in shapes:
        out += [a(s), f"a photo of {a(s)}", f"{a(s)} shape", f"a drawing of {a(s)}"]
    for c in colours:
        out += [f"{a(c)} object", f"something {c}", f"the color {c}", f"{a(c)} shape"]
    for p in ATTRIBUTES["position"]:
        out += [f"something in the {p}", f"an object in the {p}", f"a shape in the {p} of the image"]
    for z in ATTRIBUTES["size"]:
        out += [f"{a(z)} shape", f"{a(z)} object", f"{a(z)} thing"]
    for b in backgrounds:
        out += [f"a picture of {b}", f"something on {b}", f"{a(b)} background", f"{a(b)} texture"]
    for lab in ATTRIBUTES["label"]:
        out += [f"{a(lab)} shape", f"{a(lab)} object"]
    for place in ATTRIBUTES["place"]:
        out += [f"{a(place)} place", f"something in {a(place)} place"]
    out += [f"{a(c)} {s}" for c in colours for s in shapes]
    out += [f"{a(z)} {s}" for z in ATTRIBUTES["size"] for s in shapes]
    out += [f"{a(s)} on {b}" for s in shapes for b in backgrounds]
    out += [f"{a(c)} object on {b}" for c in colours for b in backgrounds]
    out += [f"{a(z)} {c} object" for z in ATTRIBUTES["size"] for c in colours]
    out += [f"{a(s)} in the {p}" for s in shapes for p in ATTRIBUTES["position"]]
    in_world = list(dict.fromkeys(out))
    d = TOY_DISTRACTORS
    out = []
    for c in d["colour"]:
        out += [f"{a(c)} object", f"something {c}", f"the color {c}"]
    for s in d["shape"]:
        out += [a(s), f"a photo of {a(s)}", f"{a(s)} shape"]
    for o in d["object"]:
        out += [a(o), f"a photo of {a(o)}"]
    for b in d["background"]:
        out += [f"a picture of {b}", f"something on {b}"]
    out += [f"a picture of {t}" for t in d["text"]]
    out += [f"{a(c)} {s}" for c in d["colour"] for s in d["shape"][:4]]
    out += [f"{a(c)} {o}" for c in colours[:2] for o in d["object"]]
    distractors = [t for t in dict.fromkeys(out) if t not in in_world]
    return in_world + distractors


def write(path: Path, lines: list[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="output folder")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    for name, make in (("descriptions", descriptions), ("words", words), ("toy", toy)):
        lines = make()
        write(args.out / f"{name}.txt", lines)
        print(f"{name}.txt: {len(lines)} texts")


if __name__ == "__main__":
    main()
